//! Understanding a customer message: sentiment and intent, each with the
//! probability of every label, from BERT checkpoints run by candle.
//!
//! This is the only module that touches candle. Inference runs on one thread
//! per model, fed by a bounded queue, batching whatever arrives together
//! ([`worker`]); the async side only awaits answers.

pub mod bert;
pub mod checkpoint;
pub mod cpu_ops;
pub mod data;
pub mod metrics;
pub mod pretrain;
pub mod rng;
pub mod tokenizer;
pub mod train;
pub mod worker;

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use candle_core::Device;
use serde::Serialize;

pub use worker::{BatchLimits, ModelWorker};

use crate::device::{self, Policy};

/// The sentiments kefu tells apart; the routing policy depends on them.
pub const SENTIMENT_LABELS: [&str; 3] = ["negative", "neutral", "positive"];

/// The intents kefu tells apart; the API and the routing policy depend on
/// exactly these.
pub const INTENT_LABELS: [&str; 11] = [
    "greeting",
    "order_status",
    "return_refund",
    "product_inquiry",
    "recommendation",
    "promotion",
    "payment_invoice",
    "account",
    "complaint",
    "human_agent",
    "other",
];

/// What a classifier is trained to predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Sentiment,
    Intent,
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::Sentiment => "sentiment",
            Task::Intent => "intent",
        }
    }

    pub fn labels(self) -> &'static [&'static str] {
        match self {
            Task::Sentiment => &SENTIMENT_LABELS,
            Task::Intent => &INTENT_LABELS,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot load {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("cannot write {path}: {reason}")]
    Save { path: PathBuf, reason: String },
    #[error("{path}:{line}: {reason}")]
    Data {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("model: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("the classifier queue is full ({0} messages waiting); retry shortly")]
    Overloaded(usize),
    #[error("the classifier has stopped")]
    Unavailable,
    #[error("classifier inference failed: {0}")]
    Inference(String),
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub fn load(path: &Path, reason: impl std::fmt::Display) -> Self {
        Error::Load {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
    pub fn save(path: &Path, reason: impl std::fmt::Display) -> Self {
        Error::Save {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
}

/// One label and its probability.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelScore {
    pub label: &'static str,
    pub probability: f32,
}

/// What kefu understood of one message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Classification {
    /// Every sentiment label, most likely first.
    pub sentiment: Vec<LabelScore>,
    /// Every intent label, most likely first.
    pub intent: Vec<LabelScore>,
    pub language: Language,
}

impl Classification {
    pub fn top_sentiment(&self) -> &LabelScore {
        &self.sentiment[0]
    }
    pub fn top_intent(&self) -> &LabelScore {
        &self.intent[0]
    }
    pub fn sentiment_probability(&self, label: &str) -> f32 {
        probability(&self.sentiment, label)
    }
    pub fn intent_probability(&self, label: &str) -> f32 {
        probability(&self.intent, label)
    }
}

fn probability(scores: &[LabelScore], label: &str) -> f32 {
    scores
        .iter()
        .find(|s| s.label == label)
        .map_or(0.0, |s| s.probability)
}

/// The customer's language, as far as kefu needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Zh,
    En,
}

impl Language {
    /// Chinese when the text has any Han character (mixed "这个size偏大吗"
    /// is answered in Chinese), English otherwise.
    pub fn detect(text: &str) -> Self {
        if text.chars().any(is_han) {
            Language::Zh
        } else {
            Language::En
        }
    }
    pub fn code(self) -> &'static str {
        match self {
            Language::Zh => "zh",
            Language::En => "en",
        }
    }
}

fn is_han(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0xF900..=0xFAFF)
}

/// Anything that can classify customer messages: the candle BERT pair here,
/// a remote classifier server later.
#[async_trait]
pub trait Classifier: Send + Sync {
    /// One classification per text, in order.
    async fn classify(&self, texts: &[String]) -> Result<Vec<Classification>, Error>;
}

/// Maps a checkpoint's label order onto kefu's fixed label set.
#[derive(Debug, Clone)]
pub struct LabelMap {
    /// For each of the model's outputs, the index in the task's labels.
    to_task: Vec<usize>,
    task: Task,
}

impl LabelMap {
    /// Accepts any checkpoint whose labels are a subset (2 or more) of the
    /// task's labels, in any order and case; labels the model lacks get
    /// probability 0.
    pub fn new(task: Task, model_labels: &[String], dir: &Path) -> Result<Self, Error> {
        let known = task.labels();
        let to_task = model_labels
            .iter()
            .map(|l| {
                let lower = l.to_lowercase();
                known.iter().position(|k| *k == lower).ok_or_else(|| {
                    Error::load(
                        dir,
                        format!(
                            "label {l:?} is not a {} label; expected some of {}",
                            task.name(),
                            known.join(", ")
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if to_task.len() < 2 {
            return Err(Error::load(dir, "a classifier needs at least two labels"));
        }
        Ok(Self { to_task, task })
    }

    /// Every task label with its probability, most likely first.
    pub fn scores(&self, probs: &[f32]) -> Vec<LabelScore> {
        let labels = self.task.labels();
        let mut out: Vec<LabelScore> = labels
            .iter()
            .map(|l| LabelScore {
                label: l,
                probability: 0.0,
            })
            .collect();
        for (i, p) in probs.iter().enumerate() {
            out[self.to_task[i]].probability = *p;
        }
        out.sort_by(|a, b| b.probability.total_cmp(&a.probability));
        out
    }
}

/// Settings shared by the BERT classifiers.
#[derive(Debug, Clone)]
pub struct BertSettings {
    /// Longest input in tokens, `[CLS]` and `[SEP]` included.
    pub max_len: usize,
    pub limits: BatchLimits,
    /// Where the classifiers run.
    pub device: Policy,
}

/// candle's device for `policy`, and the reason for the log. The refusal
/// (`--gpu-fallback refuse`) is an `Error::Invalid` worded for operators.
pub fn place(policy: Policy) -> Result<(Device, String), Error> {
    let placement = device::decide(policy, device::BUILT_WITH_CUDA, || {
        Device::new_cuda(0).map_err(|e| device::first_line(&e.to_string()))
    })
    .map_err(Error::Invalid)?;
    Ok((placement.gpu.unwrap_or(Device::Cpu), placement.reason))
}

/// `cuda:0` or `cpu`, as the logs and `kefu bench` print it.
pub fn device_label(device: &Device) -> &'static str {
    if device.is_cuda() {
        "cuda:0"
    } else {
        "cpu"
    }
}

/// Loads a checkpoint on `device`; when that is the GPU and loading fails
/// (out of memory), on the CPU or not at all, as `policy` says.
pub fn load_placed(
    dir: &Path,
    max_len: usize,
    device: &Device,
    reason: &str,
    policy: Policy,
) -> Result<(checkpoint::Checkpoint, Device, String), Error> {
    match checkpoint::Checkpoint::load(dir, max_len, device) {
        Ok(ckpt) => Ok((ckpt, device.clone(), reason.to_string())),
        Err(e) if device.is_cuda() => {
            let fallback =
                device::after_gpu_failure::<()>(policy, &e.to_string()).map_err(Error::Invalid)?;
            let ckpt = checkpoint::Checkpoint::load(dir, max_len, &Device::Cpu)?;
            Ok((ckpt, Device::Cpu, fallback.reason))
        }
        Err(e) => Err(e),
    }
}

/// Sentiment and intent from two BERT checkpoints, each on its own thread.
pub struct BertClassifier {
    sentiment: ModelWorker,
    intent: ModelWorker,
}

impl BertClassifier {
    /// Loads both checkpoints where `settings.device` says. Blocking: call
    /// from a blocking context.
    pub fn load(sentiment: &Path, intent: &Path, settings: &BertSettings) -> Result<Self, Error> {
        let (device, reason) = place(settings.device)?;
        let load = |task: Task, dir: &Path| -> Result<ModelWorker, Error> {
            let (ckpt, device, reason) =
                load_placed(dir, settings.max_len, &device, &reason, settings.device)?;
            let map = LabelMap::new(task, &ckpt.labels, dir)?;
            tracing::info!(
                task = ?task,
                model = %dir.display(),
                labels = ckpt.labels.len(),
                layers = ckpt.config.num_hidden_layers,
                hidden = ckpt.config.hidden_size,
                device = device_label(&device),
                reason = %reason,
                "classifier loaded"
            );
            Ok(ModelWorker::spawn(
                ckpt,
                device,
                map,
                settings.limits.clone(),
            ))
        };
        Ok(Self {
            sentiment: load(Task::Sentiment, sentiment)?,
            intent: load(Task::Intent, intent)?,
        })
    }

    /// Where the classifiers run: `cuda:0` or `cpu`, or each one's device
    /// when a GPU load fell back for one of them only.
    pub fn device(&self) -> String {
        let (s, i) = (self.sentiment.device(), self.intent.device());
        if s == i {
            s.to_string()
        } else {
            format!("sentiment {s}, intent {i}")
        }
    }
}

#[async_trait]
impl Classifier for BertClassifier {
    async fn classify(&self, texts: &[String]) -> Result<Vec<Classification>, Error> {
        let sentiment = self.sentiment.classify_all(texts);
        let intent = self.intent.classify_all(texts);
        let (sentiment, intent) = futures::try_join!(sentiment, intent)?;
        Ok(sentiment
            .into_iter()
            .zip(intent)
            .zip(texts)
            .map(|((sentiment, intent), text)| Classification {
                sentiment,
                intent,
                language: Language::detect(text),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn language_follows_han_characters() {
        assert_eq!(Language::detect("where is my parcel"), Language::En);
        assert_eq!(Language::detect("这个size偏大吗"), Language::Zh);
        assert_eq!(Language::detect("订单 4512876390123"), Language::Zh);
        assert_eq!(Language::detect("🙏🙏"), Language::En);
    }

    #[test]
    fn label_map_reorders_and_fills_missing_labels() {
        let labels = vec!["POSITIVE".to_string(), "negative".to_string()];
        let map = LabelMap::new(Task::Sentiment, &labels, Path::new("m")).unwrap();
        let scores = map.scores(&[0.7, 0.3]);
        assert_eq!(scores[0].label, "positive");
        assert_eq!(scores[1].label, "negative");
        assert_eq!(scores[2].label, "neutral");
        assert_eq!(scores[2].probability, 0.0);
    }

    #[test]
    fn label_map_rejects_unknown_labels() {
        let labels = vec!["LABEL_0".to_string(), "LABEL_1".to_string()];
        let err = LabelMap::new(Task::Intent, &labels, Path::new("m")).unwrap_err();
        assert!(err.to_string().contains("LABEL_0"), "{err}");
    }
}
