//! `kefu train`: fine-tune or train from scratch a
//! `BertForSequenceClassification`, the seed study's recipe in Rust: AdamW
//! with weight decay off for biases and LayerNorm, linear warm-up then linear
//! decay, gradient clipping at 1.0, deterministic shuffling, the best epoch
//! by dev accuracy kept and written atomically in the Hugging Face layout.

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use indicatif::{ProgressBar, ProgressStyle};
use tokenizers::Tokenizer;

use super::bert::BertConfig;
use super::checkpoint::{Checkpoint, Trainable};
use super::data::{read_jsonl, Example};
use super::metrics::Metrics;
pub use super::rng::Rng;
use super::worker::{pad_id, WindowRows};
use super::{tokenizer, Error, Task};

/// Shape of a model trained from scratch.
#[derive(Debug, Clone)]
pub struct FreshModel {
    /// A WordPiece `vocab.txt` (e.g. bert-base-chinese's); `None` builds one
    /// from the training text.
    pub vocab: Option<PathBuf>,
    pub hidden_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate_size: usize,
    /// Tokens seen fewer times than this are left out of a built vocabulary.
    pub min_token_count: usize,
    /// With `vocab`: also add the whole Latin-script words found in at least
    /// this many distinct training texts that the vocabulary lacks.
    pub add_words: Option<usize>,
}

#[derive(Debug, Clone)]
pub enum Init {
    /// Fine-tune an existing checkpoint directory.
    Pretrained(PathBuf),
    Fresh(FreshModel),
}

#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub task: Task,
    pub data: PathBuf,
    pub dev: PathBuf,
    pub out: PathBuf,
    pub init: Init,
    pub run: RunOptions,
    /// For training lines with a teacher's `probabilities`, how much of the
    /// target is the teacher's distribution (the rest is the gold label).
    pub soft_weight: f64,
    /// Windows of a long text that become training rows, and that a dev
    /// text is read in (see [`tokenizer::encode_windows`]); 1 truncates.
    pub windows: usize,
}

/// How a training run goes; `kefu train` and `kefu pretrain` alike.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub seed: u64,
    pub max_len: usize,
    /// Stop after this many optimiser steps (for smoke runs).
    pub max_steps: Option<usize>,
    /// Store weights in f16 (half the size; logits agree to ~1e-3).
    pub half: bool,
    /// Evaluate and save an exponential moving average of the weights with
    /// this decay per step (e.g. 0.999) instead of the weights themselves.
    pub average: Option<f64>,
    pub progress: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainReport {
    pub steps: usize,
    pub best_epoch: usize,
    pub best_dev_accuracy: f64,
    /// Mean training loss of each epoch.
    pub epoch_losses: Vec<f64>,
    /// Loss of every step, in order.
    pub step_losses: Vec<f32>,
    pub train_examples: usize,
    /// Rows trained on: one per example, or one per window with `--windows`.
    pub train_rows: usize,
    pub dev_examples: usize,
    /// Weights that started fresh when fine-tuning: the classifier, and the
    /// pooler when the checkpoint is a masked-LM one.
    pub fresh_head: Vec<String>,
}

/// Learning rate at `step` (0-based): linear warm-up to `peak`, then linear
/// decay to 0 at `total`, as transformers' `get_linear_schedule_with_warmup`.
pub fn learning_rate(step: usize, total: usize, warmup: usize, peak: f64) -> f64 {
    if step < warmup {
        peak * (step + 1) as f64 / warmup as f64
    } else {
        let left = total.saturating_sub(step) as f64;
        let span = total.saturating_sub(warmup).max(1) as f64;
        peak * (left / span).max(0.0)
    }
}

/// Batches of example indices for one epoch: shuffled, then sorted by length
/// within windows of 50 batches so that rows of a batch pad to similar
/// lengths, then the batches shuffled again.
pub(crate) fn epoch_batches(lengths: &[usize], batch: usize, rng: &mut Rng) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    rng.shuffle(&mut order);
    let mut batches = Vec::new();
    for window in order.chunks(batch * 50) {
        let mut window = window.to_vec();
        window.sort_by_key(|&i| lengths[i]);
        batches.extend(window.chunks(batch).map(<[usize]>::to_vec));
    }
    rng.shuffle(&mut batches);
    batches
}

/// Builds a WordPiece vocabulary from training text: the special tokens,
/// every character seen (and its `##` continuation form, so no word is ever
/// unknown), and whole words seen at least `min_count` times.
pub fn build_vocab(texts: &[&str], min_count: usize) -> Vec<String> {
    let mut chars: HashMap<String, usize> = HashMap::new();
    let mut words: HashMap<String, usize> = HashMap::new();
    for text in texts {
        let lower = text.to_lowercase();
        let mut word = String::new();
        let mut flush = |word: &mut String| {
            if word.chars().count() > 1 {
                *words.entry(std::mem::take(word)).or_default() += 1;
            }
            word.clear();
        };
        for c in lower.chars() {
            if c.is_whitespace() || c.is_control() {
                flush(&mut word);
            } else if super::is_han(c) || c.is_ascii_punctuation() || !c.is_alphanumeric() {
                flush(&mut word);
                *chars.entry(c.to_string()).or_default() += 1;
            } else {
                word.push(c);
                *chars.entry(c.to_string()).or_default() += 1;
            }
        }
        flush(&mut word);
    }
    let mut vocab: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut chars: Vec<(String, usize)> = chars.into_iter().collect();
    chars.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for (c, _) in &chars {
        vocab.push(c.clone());
    }
    for (c, _) in &chars {
        if !c.chars().any(super::is_han) {
            vocab.push(format!("##{c}"));
        }
    }
    let mut words: Vec<(String, usize)> =
        words.into_iter().filter(|(_, n)| *n >= min_count).collect();
    words.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    vocab.extend(words.into_iter().map(|(w, _)| w));
    vocab
}

/// The whole words of 2+ Latin letters (lower-cased, as BertTokenizer sees
/// them) found in at least `min_texts` distinct texts that `vocab` lacks, most
/// frequent first. bert-base-chinese's vocabulary cuts common English into
/// pieces ("perfect" is `pe ##rf ##ect`), which a small model trained on a
/// few thousand English lines learns slowly; added whole, such a word gets
/// one embedding of its own.
pub fn missing_words(texts: &[&str], vocab: &[String], min_texts: usize) -> Vec<String> {
    let known: HashSet<&str> = vocab.iter().map(String::as_str).collect();
    let distinct: HashSet<&str> = texts.iter().copied().collect();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for text in distinct {
        let lower = text.to_lowercase();
        let words: HashSet<&str> = lower
            .split(|c: char| !c.is_ascii_alphabetic())
            .filter(|w| w.len() > 1 && !known.contains(w))
            .collect();
        for w in words {
            *counts.entry(w.to_string()).or_default() += 1;
        }
    }
    let mut words: Vec<(String, usize)> = counts
        .into_iter()
        .filter(|(_, n)| *n >= min_texts)
        .collect();
    words.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    words.into_iter().map(|(w, _)| w).collect()
}

/// The tokenizer of a fresh model: `shape.vocab` as it is, or with the words
/// of `texts` it lacks (`shape.add_words`), or a vocabulary built from
/// `texts`. A vocabulary made here goes through the file `scratch`, removed
/// afterwards; the checkpoint saves the tokenizer's own copy.
pub(crate) fn fresh_tokenizer(
    shape: &FreshModel,
    texts: &[&str],
    scratch: &Path,
) -> Result<Tokenizer, Error> {
    let config = tokenizer::BertTokenizerConfig::default();
    let vocab = match (&shape.vocab, shape.add_words) {
        (Some(path), None) => return tokenizer::from_vocab(path, &config),
        (Some(path), Some(min_texts)) => {
            let text = std::fs::read_to_string(path).map_err(|e| Error::load(path, e))?;
            let mut vocab: Vec<String> = text.lines().map(str::to_string).collect();
            let added = missing_words(texts, &vocab, min_texts.max(1));
            tracing::info!(
                added = added.len(),
                "whole words of the training text added to the vocabulary of {}",
                path.display()
            );
            vocab.extend(added);
            vocab
        }
        (None, _) => build_vocab(texts, shape.min_token_count),
    };
    std::fs::write(scratch, vocab.join("\n") + "\n").map_err(|e| Error::save(scratch, e))?;
    let tok = tokenizer::from_vocab(scratch, &config);
    let _ = std::fs::remove_file(scratch);
    tok
}

pub(crate) struct Encoded {
    ids: Vec<Vec<u32>>,
    labels: Vec<u32>,
    soft: Vec<Option<Vec<f32>>>,
}

/// Token rows of `examples`, each with its example's label and teacher
/// distribution: one row per example, or with `windows` above 1 one per
/// window of a text longer than the tokenizer's maximum length, so the model
/// learns from the end of a long review as well as from its opening.
fn encode_all(tok: &Tokenizer, examples: &[Example], windows: usize) -> Result<Encoded, Error> {
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let WindowRows { rows, owner } = WindowRows::new(tok, &texts, windows)?;
    Ok(Encoded {
        labels: owner.iter().map(|&i| examples[i].label as u32).collect(),
        soft: owner.iter().map(|&i| examples[i].soft.clone()).collect(),
        ids: rows,
    })
}

/// The training target of each row of a batch: the gold label, blended with
/// `weight` of the teacher's distribution where a row has one; `None` when
/// no row has one (plain cross-entropy then).
pub(crate) fn soft_targets(
    labels: &[u32],
    soft: &[Option<&[f32]>],
    n_labels: usize,
    weight: f64,
) -> Option<Vec<f32>> {
    if weight <= 0.0 || soft.iter().all(Option::is_none) {
        return None;
    }
    let w = weight as f32;
    let mut out = vec![0f32; labels.len() * n_labels];
    for (row, (&gold, teacher)) in out.chunks_mut(n_labels).zip(labels.iter().zip(soft)) {
        match teacher {
            Some(p) => {
                for (t, &p) in row.iter_mut().zip(p.iter()) {
                    *t = w * p;
                }
                row[gold as usize] += 1.0 - w;
            }
            None => row[gold as usize] = 1.0,
        }
    }
    Some(out)
}

/// Cross-entropy of `logits` against `targets`, one distribution per row:
/// `-Σ target·log softmax(logits)`, averaged over the rows.
fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(logits, 1)?;
    (log_probs * targets)?.sum(1)?.mean(0)?.neg()
}

/// Accuracy and friends of a checkpoint on labelled examples, each text
/// read as the service reads it: long ones in up to `windows` windows
/// whose probabilities are averaged (training's dev figure reads them so
/// too with `kefu train --windows`, and only the first window without).
pub fn evaluate(
    ckpt: &Checkpoint,
    path: &Path,
    batch: usize,
    windows: usize,
) -> Result<Metrics, Error> {
    let labels: Vec<&str> = ckpt.labels.iter().map(String::as_str).collect();
    let examples = read_jsonl(path, &labels)?;
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let probs = super::worker::classify_texts(
        &ckpt.model,
        &ckpt.tokenizer,
        &texts,
        windows,
        batch,
        &Device::Cpu,
    )?;
    let pred: Vec<usize> = probs.iter().map(|p| argmax(p)).collect();
    let gold: Vec<usize> = examples.iter().map(|e| e.label).collect();
    Ok(Metrics::compute(&ckpt.labels, &gold, &pred))
}

/// The index of the largest probability (the first of equals).
fn argmax(p: &[f32]) -> usize {
    (0..p.len()).fold(0, |best, i| if p[i] > p[best] { i } else { best })
}

/// AdamW as the seed's recipe sets it up: weight decay for weights but not
/// for biases and LayerNorm, gradients clipped to a global norm of 1.0, the
/// learning rate warmed up then decayed linearly ([`learning_rate`]).
pub(crate) struct Optimiser {
    decay: AdamW,
    plain: AdamW,
    vars: Vec<Var>,
    total: usize,
    warmup: usize,
    peak: f64,
}

impl Optimiser {
    pub(crate) fn new(
        varmap: &candle_nn::VarMap,
        peak: f64,
        weight_decay: f64,
        total: usize,
        warmup_ratio: f64,
    ) -> Result<Self, Error> {
        type Named = Vec<(String, Var)>;
        let mut named: Named = varmap
            .data()
            .lock()
            .expect("varmap lock poisoned")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // In name order, so the gradient norm is summed the same way in
        // every run (a HashMap's order differs from process to process).
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let (decay, no_decay): (Named, Named) = named
            .into_iter()
            .partition(|(k, _)| !(k.ends_with("bias") || k.contains("LayerNorm")));
        let vars: Vec<Var> = decay
            .iter()
            .chain(&no_decay)
            .map(|(_, v)| v.clone())
            .collect();
        let params = |wd: f64| ParamsAdamW {
            lr: peak,
            weight_decay: wd,
            ..ParamsAdamW::default()
        };
        Ok(Self {
            decay: AdamW::new(
                decay.into_iter().map(|(_, v)| v).collect(),
                params(weight_decay),
            )?,
            plain: AdamW::new(no_decay.into_iter().map(|(_, v)| v).collect(), params(0.0))?,
            vars,
            total,
            warmup: ((total as f64) * warmup_ratio).round() as usize,
            peak,
        })
    }

    /// Back-propagates `loss` and updates every variable; returns the
    /// learning rate used and the loss's value. A loss that is not finite
    /// stops training.
    pub(crate) fn step(&mut self, loss: &Tensor, step: usize) -> Result<(f64, f32), Error> {
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(Error::Invalid(format!(
                "training diverged at step {step} (loss {value}); lower --learning-rate"
            )));
        }
        let mut grads = loss.backward()?;
        global_norm_clip(&mut grads, &self.vars, 1.0)?;
        let lr = learning_rate(step, self.total, self.warmup, self.peak);
        self.decay.set_learning_rate(lr);
        self.plain.set_learning_rate(lr);
        self.decay.step(&grads)?;
        self.plain.step(&grads)?;
        Ok((lr, value))
    }
}

/// Progress of a training run: a live bar on a terminal; in logs (CI, nohup)
/// a plain line every ~5% of the steps.
pub(crate) struct Progress {
    bar: ProgressBar,
    plain: bool,
    enabled: bool,
    every: usize,
    total: usize,
    started: std::time::Instant,
}

impl Progress {
    pub(crate) fn new(total: usize, enabled: bool) -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = if enabled && tty {
            ProgressBar::new(total as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} steps  {msg}  eta {eta}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        Self {
            bar,
            plain: enabled && !tty,
            enabled,
            every: (total / 20).max(1),
            total,
            started: std::time::Instant::now(),
        }
    }

    /// Step `step` (1-based) is done; `msg` says how it went.
    pub(crate) fn step(&self, step: usize, msg: String) {
        if self.plain && step.is_multiple_of(self.every) {
            eprintln!(
                "step {step}/{}  {msg}  {:.0} s",
                self.total,
                self.started.elapsed().as_secs_f64()
            );
        }
        self.bar.set_message(msg);
        self.bar.inc(1);
    }

    /// A line that stays (an epoch's result).
    pub(crate) fn println(&self, line: String) {
        if self.plain {
            eprintln!("{line}");
        } else if self.enabled {
            self.bar.println(line);
        }
    }

    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// The bookkeeping of a training loop, shared by `kefu train` and `kefu
/// pretrain`: the optimiser, the step count against the run's total, every
/// step's loss, the epoch's mean and the progress display.
pub(crate) struct Steps {
    optimiser: Optimiser,
    average: Option<WeightAverage>,
    progress: Progress,
    step: usize,
    total: usize,
    losses: Vec<f32>,
    ema: Option<f64>,
    epoch_loss: f64,
    epoch_steps: usize,
}

impl Steps {
    /// For `examples` training rows per epoch, as `run` says.
    pub(crate) fn new(
        varmap: &candle_nn::VarMap,
        run: &RunOptions,
        examples: usize,
    ) -> Result<Self, Error> {
        keep_freed_buffers();
        let mut total = examples.div_ceil(run.batch_size) * run.epochs;
        if let Some(max) = run.max_steps {
            total = total.min(max);
        }
        let optimiser = Optimiser::new(
            varmap,
            run.learning_rate,
            run.weight_decay,
            total,
            run.warmup_ratio,
        )?;
        let average = match run.average {
            Some(decay) if (0.0..1.0).contains(&decay) => {
                Some(WeightAverage::new(&optimiser.vars, decay)?)
            }
            Some(decay) => {
                return Err(Error::Invalid(format!(
                    "--average {decay}: the decay must be at least 0 and below 1"
                )))
            }
            None => None,
        };
        Ok(Self {
            optimiser,
            average,
            progress: Progress::new(total, run.progress),
            step: 0,
            total,
            losses: Vec::new(),
            ema: None,
            epoch_loss: 0.0,
            epoch_steps: 0,
        })
    }

    /// Whether the run has taken all its steps.
    pub(crate) fn done(&self) -> bool {
        self.step >= self.total
    }

    /// One optimiser step on `loss` (named `what` in the progress line).
    pub(crate) fn take(&mut self, loss: &Tensor, epoch: usize, what: &str) -> Result<(), Error> {
        let (lr, value) = self.optimiser.step(loss, self.step)?;
        if let Some(average) = &mut self.average {
            average.update()?;
        }
        self.step += 1;
        self.epoch_steps += 1;
        self.epoch_loss += value as f64;
        self.losses.push(value);
        let e = self
            .ema
            .map_or(value as f64, |e| 0.95 * e + 0.05 * value as f64);
        self.ema = Some(e);
        self.progress.step(
            self.step,
            format!("epoch {epoch}  {what} {e:.4}  lr {lr:.2e}"),
        );
        Ok(())
    }

    /// The end-of-epoch check of `kefu train` and `kefu pretrain`: `score`s
    /// the weights the run keeps (the moving average when it averages, else
    /// the weights as they are) and `save`s them when the score beats
    /// `best`. Returns the score and whether it was saved.
    pub(crate) fn keep_if_better(
        &self,
        best: f64,
        score: impl FnOnce() -> Result<f64, Error>,
        save: impl FnOnce() -> Result<(), Error>,
    ) -> Result<(f64, bool), Error> {
        let check = || {
            let value = score()?;
            let better = value > best;
            if better {
                save()?;
            }
            Ok((value, better))
        };
        match &self.average {
            Some(average) => average.swapped_in(check),
            None => check(),
        }
    }

    /// What an epoch's line says after its score: which weights were scored
    /// and whether they were saved.
    pub(crate) fn epoch_note(&self, saved: bool) -> &'static str {
        match (self.average.is_some(), saved) {
            (true, true) => " (averaged weights) (best so far, saved)",
            (true, false) => " (averaged weights)",
            (false, true) => " (best so far, saved)",
            (false, false) => "",
        }
    }

    /// The mean loss of the epoch just finished; `None` when it took no step.
    pub(crate) fn end_epoch(&mut self) -> Option<f64> {
        let mean = (self.epoch_steps > 0).then(|| self.epoch_loss / self.epoch_steps as f64);
        (self.epoch_loss, self.epoch_steps) = (0.0, 0);
        mean
    }

    pub(crate) fn println(&self, line: String) {
        self.progress.println(line);
    }

    /// Steps taken and every step's loss.
    pub(crate) fn finish(self) -> (usize, Vec<f32>) {
        self.progress.finish();
        (self.step, self.losses)
    }
}

/// An exponential moving average of every trained weight (Polyak
/// averaging), updated after each optimiser step. The average moves less
/// from batch to batch than the weights do, so the epoch picked by dev
/// accuracy is less often a lucky spike. As in timm's `ModelEmaV2`, the decay
/// starts low and rises to its set value ((1 + t) / (10 + t) at update t),
/// so the starting weights are soon forgotten.
struct WeightAverage {
    decay: f64,
    updates: usize,
    vars: Vec<Var>,
    shadow: Vec<Tensor>,
}

impl WeightAverage {
    fn new(vars: &[Var], decay: f64) -> Result<Self, Error> {
        let shadow = vars
            .iter()
            .map(|v| v.as_tensor().detach().copy())
            .collect::<Result<_, _>>()?;
        Ok(Self {
            decay,
            updates: 0,
            vars: vars.to_vec(),
            shadow,
        })
    }

    fn update(&mut self) -> Result<(), Error> {
        self.updates += 1;
        let t = self.updates as f64;
        let d = self.decay.min((1.0 + t) / (10.0 + t));
        for (v, s) in self.vars.iter().zip(&mut self.shadow) {
            // Detached, or each update would join the autograd graph and
            // keep every earlier average alive.
            let w = v.as_tensor().detach();
            *s = s.affine(d, 0.0)?.add(&w.affine(1.0 - d, 0.0)?)?;
        }
        Ok(())
    }

    /// Runs `f` with the averaged weights in the model, then puts the
    /// trained ones back (also when `f` fails), so training goes on from
    /// where it was.
    fn swapped_in<T>(&self, f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
        let live = self
            .vars
            .iter()
            .map(|v| v.as_tensor().detach().copy())
            .collect::<Result<Vec<_>, _>>()?;
        for (v, s) in self.vars.iter().zip(&self.shadow) {
            v.set(s)?;
        }
        let out = f();
        for (v, l) in self.vars.iter().zip(&live) {
            v.set(l)?;
        }
        out
    }
}

/// Lets a training loop reuse its buffers instead of faulting them in anew
/// every step.
///
/// candle gives every op's output (and every gradient) a fresh `Vec`, so a
/// step allocates and frees the same few-megabyte buffers dozens of times:
/// the embedding table's gradient and Adam moments alone are 10.8 MB each
/// with bert-base-chinese's vocabulary. glibc's malloc serves large blocks
/// with their own `mmap` and hands the freed top of a heap back to the
/// system, so each of those buffers was page-faulted and zeroed by the
/// kernel again on every use: a third of a training step's time was in the
/// kernel (`perf`: `clear_page_erms` under `unary_map`/`binary_map`).
/// Serving blocks up to 32 MiB (glibc's maximum) from the heap and keeping
/// up to 1 GiB of freed memory there made the default sentiment and intent
/// recipes 1.5x and 2.4x faster on one core, with the same peak memory
/// (BENCHMARKS.md, "Training speed"). Both settings are needed: either
/// alone still leaves most of the faults. They are process-wide, so a
/// process that has trained keeps up to 1 GiB of freed memory for reuse
/// (kefu's server never trains); other allocators than glibc's are left
/// alone.
fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only sets malloc's tuning parameters, under
            // malloc's own lock; no memory is touched.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
                libc::mallopt(libc::M_TOP_PAD, 64 << 20);
            }
        });
    }
}

fn global_norm_clip(
    grads: &mut candle_core::backprop::GradStore,
    vars: &[Var],
    max_norm: f64,
) -> Result<(), Error> {
    let mut total = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v) {
            total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = total.sqrt();
    if norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for v in vars {
            if let Some(g) = grads.remove(v) {
                grads.insert(v, (g * scale)?);
            }
        }
    }
    Ok(())
}

/// The outcome of a training run: the report, and the model as it was after
/// the last step (the best epoch is what was written to disk).
pub struct Trained {
    pub report: TrainReport,
    pub last: Trainable,
    pub tokenizer: Tokenizer,
}

/// Trains a classifier as `opts` says and writes the best checkpoint to
/// `opts.out`.
pub fn train(opts: &TrainOptions) -> Result<Trained, Error> {
    if opts.run.batch_size == 0 || opts.run.epochs == 0 {
        return Err(Error::Invalid(
            "--batch-size and --epochs must be at least 1".into(),
        ));
    }
    let device = Device::Cpu;
    super::rng::seed_dropout(opts.run.seed);
    let task_labels: Vec<String> = opts.task.labels().iter().map(|s| s.to_string()).collect();
    let labels: Vec<&str> = opts.task.labels().to_vec();
    let train_ex = read_jsonl(&opts.data, &labels)?;
    let dev_ex = read_jsonl(&opts.dev, &labels)?;

    let (trainable, mut tok, fresh_head) = match &opts.init {
        Init::Pretrained(dir) => {
            let (t, fresh) = Trainable::from_pretrained(dir, &task_labels, &device, opts.run.seed)?;
            let max_len = opts.run.max_len.min(t.config.max_position_embeddings);
            let tok = tokenizer::load(dir, max_len)?;
            (t, tok, fresh)
        }
        Init::Fresh(shape) => {
            let texts: Vec<&str> = train_ex.iter().map(|e| e.text.as_str()).collect();
            let tok = fresh_tokenizer(shape, &texts, &tempfile_path(&opts.out, "vocab.txt"))?;
            let vocab_size = tok.get_vocab_size(true);
            let config = BertConfig::new_small(
                vocab_size,
                shape.hidden_size,
                shape.layers,
                shape.heads,
                shape.intermediate_size,
                opts.run.max_len.max(8),
                &task_labels,
            );
            config.validate().map_err(Error::Invalid)?;
            (
                Trainable::fresh(config, &device, opts.run.seed)?,
                tok,
                Vec::new(),
            )
        }
    };
    // Truncate to what the model's position table holds.
    tokenizer_set_max(
        &mut tok,
        opts.run
            .max_len
            .min(trainable.config.max_position_embeddings),
    )?;
    let pad = pad_id(&tok);
    let train_enc = encode_all(&tok, &train_ex, opts.windows)?;
    // Dev texts are read as the service reads them: truncated, or with
    // --windows in windows whose probabilities are averaged.
    let dev_texts: Vec<&str> = dev_ex.iter().map(|e| e.text.as_str()).collect();
    let dev_rows = WindowRows::new(&tok, &dev_texts, opts.windows)?;
    let lengths: Vec<usize> = train_enc.ids.iter().map(Vec::len).collect();

    let mut steps = Steps::new(&trainable.varmap, &opts.run, train_enc.ids.len())?;
    let mut rng = Rng::new(opts.run.seed);
    let mut report = TrainReport {
        steps: 0,
        best_epoch: 0,
        best_dev_accuracy: -1.0,
        epoch_losses: Vec::new(),
        step_losses: Vec::new(),
        train_examples: train_ex.len(),
        train_rows: train_enc.ids.len(),
        dev_examples: dev_ex.len(),
        fresh_head,
    };
    for epoch in 1..=opts.run.epochs {
        for batch in epoch_batches(&lengths, opts.run.batch_size, &mut rng) {
            if steps.done() {
                break;
            }
            let rows: Vec<&[u32]> = batch.iter().map(|&i| train_enc.ids[i].as_slice()).collect();
            let targets: Vec<u32> = batch.iter().map(|&i| train_enc.labels[i]).collect();
            let soft: Vec<Option<&[f32]>> = batch
                .iter()
                .map(|&i| train_enc.soft[i].as_deref())
                .collect();
            let (ids, masks) = super::worker::pad(&rows, pad);
            let (ids, masks) = super::bert::batch_tensors(&ids, &masks, &device)?;
            let logits = trainable.model.forward(&ids, &masks, true)?;
            let loss = match soft_targets(&targets, &soft, labels.len(), opts.soft_weight) {
                Some(blend) => {
                    let blend = Tensor::from_vec(blend, (batch.len(), labels.len()), &device)?;
                    soft_cross_entropy(&logits, &blend)?
                }
                None => candle_nn::loss::cross_entropy(&logits, &Tensor::new(targets, &device)?)?,
            };
            steps.take(&loss, epoch, "loss")?;
        }
        let Some(mean_loss) = steps.end_epoch() else {
            break;
        };
        let (acc, best) = steps.keep_if_better(
            report.best_dev_accuracy,
            || {
                let probs = dev_rows.probabilities(&trainable.model, pad, 64, &device)?;
                let correct = probs
                    .iter()
                    .zip(&dev_ex)
                    .filter(|(p, e)| argmax(p) == e.label)
                    .count();
                Ok(correct as f64 / probs.len() as f64)
            },
            || save_atomically(&trainable, &tok, &opts.out, opts.run.half),
        )?;
        report.epoch_losses.push(mean_loss);
        steps.println(format!(
            "epoch {epoch}: train loss {mean_loss:.4}, dev accuracy {acc:.4}{}",
            steps.epoch_note(best)
        ));
        if best {
            report.best_dev_accuracy = acc;
            report.best_epoch = epoch;
        }
        if steps.done() {
            break;
        }
    }
    (report.steps, report.step_losses) = steps.finish();
    Ok(Trained {
        report,
        last: trainable,
        tokenizer: tok,
    })
}

pub(crate) fn tokenizer_set_max(tok: &mut Tokenizer, max_len: usize) -> Result<(), Error> {
    tok.with_truncation(Some(tokenizers::TruncationParams {
        max_length: max_len,
        ..Default::default()
    }))
    .map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok(())
}

fn tempfile_path(out: &Path, what: &str) -> PathBuf {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let _ = std::fs::create_dir_all(parent);
    parent.join(format!(".kefu-{}-{what}", std::process::id()))
}

/// Writes the checkpoint next to `out` and renames it into place, so a
/// reader never sees half a checkpoint and a crash leaves the old one.
pub fn save_atomically(
    t: &Trainable,
    tok: &Tokenizer,
    out: &Path,
    half: bool,
) -> Result<(), Error> {
    write_atomically(out, |tmp| t.save(tmp, tok, half))
}

/// Lets `write` fill a directory beside `out`, then renames it to `out`.
pub(crate) fn write_atomically(
    out: &Path,
    write: impl FnOnce(&Path) -> Result<(), Error>,
) -> Result<(), Error> {
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::save(out, "--out must name a directory"))?;
    let tmp = tempfile_path(out, &format!("{name}.tmp"));
    let old = tempfile_path(out, &format!("{name}.old"));
    let _ = std::fs::remove_dir_all(&tmp);
    write(&tmp)?;
    if out.exists() {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(out, &old).map_err(|e| Error::save(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::save(out, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_targets_blend_the_teacher_into_the_gold_label() {
        let teacher = [0.2f32, 0.8, 0.0];
        let got = soft_targets(&[0, 2], &[Some(&teacher), None], 3, 0.25).unwrap();
        let want = [0.8f32, 0.2, 0.0, 0.0, 0.0, 1.0];
        assert!(
            got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-6),
            "{got:?}"
        );
        assert_eq!(soft_targets(&[0, 2], &[None, None], 3, 0.25), None);
        assert_eq!(soft_targets(&[0], &[Some(&teacher)], 3, 0.0), None);
    }

    #[test]
    fn soft_cross_entropy_on_one_hot_targets_is_cross_entropy() {
        let logits = Tensor::new(&[[1.0f32, -0.5, 2.0], [0.3, 0.1, -1.0]], &Device::Cpu).unwrap();
        let hard = candle_nn::loss::cross_entropy(
            &logits,
            &Tensor::new(&[2u32, 0], &Device::Cpu).unwrap(),
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        let one_hot = Tensor::new(&[[0f32, 0.0, 1.0], [1.0, 0.0, 0.0]], &Device::Cpu).unwrap();
        let soft = soft_cross_entropy(&logits, &one_hot)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((hard - soft).abs() < 1e-6, "{hard} vs {soft}");
    }

    #[test]
    fn the_weight_average_follows_its_decay_and_holds_no_graph() {
        let x = [1f32, 2.0, 3.0];
        let var = Var::new(&x, &Device::Cpu).unwrap();
        let mut average = WeightAverage::new(std::slice::from_ref(&var), 0.5).unwrap();
        // The weights double each step; the decay is min(0.5, (1+t)/(10+t)).
        for _ in 0..3 {
            var.set(&var.as_tensor().affine(2.0, 0.0).unwrap()).unwrap();
            average.update().unwrap();
        }
        // 1 -> 2/11*1 + 9/11*2 = 20/11 -> 1/4*20/11 + 3/4*4 = 38/11
        // -> 4/13*38/11 + 9/13*8 = 944/143, times each starting weight.
        let want: Vec<f32> = x.iter().map(|v| v * 944.0 / 143.0).collect();
        let close = |t: &Tensor, want: &[f32]| {
            let got = t.to_vec1::<f32>().unwrap();
            got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-5)
        };
        assert!(close(&average.shadow[0], &want));
        // An average that joined the autograd graph would keep every
        // earlier one alive (a 23 GB sentiment run before this was caught).
        assert!(!average.shadow[0].track_op());
        let inside = average.swapped_in(|| Ok(var.as_tensor().copy()?)).unwrap();
        assert!(close(&inside, &want), "the average is swapped in");
        let live: Vec<f32> = x.iter().map(|v| v * 8.0).collect();
        assert!(close(var.as_tensor(), &live), "and the weights put back");
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert!((learning_rate(0, 100, 10, 1.0) - 0.1).abs() < 1e-12);
        assert!((learning_rate(9, 100, 10, 1.0) - 1.0).abs() < 1e-12);
        assert!((learning_rate(10, 100, 10, 1.0) - 1.0).abs() < 1e-12);
        assert!((learning_rate(55, 100, 10, 1.0) - 0.5).abs() < 1e-12);
        assert_eq!(learning_rate(100, 100, 10, 1.0), 0.0);
    }

    #[test]
    fn shuffles_are_deterministic_and_complete() {
        let lengths: Vec<usize> = (0..103).map(|i| i % 17).collect();
        let a = epoch_batches(&lengths, 8, &mut Rng::new(7));
        let b = epoch_batches(&lengths, 8, &mut Rng::new(7));
        assert_eq!(a, b);
        let mut all: Vec<usize> = a.concat();
        all.sort();
        assert_eq!(all, (0..103).collect::<Vec<_>>());
        assert_ne!(a, epoch_batches(&lengths, 8, &mut Rng::new(8)));
    }

    #[test]
    fn missing_words_adds_frequent_whole_words_the_vocab_lacks() {
        let vocab: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "is", "##s"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let texts = [
            "The parcel is PERFECT",
            "perfect, thanks!! 谢谢",
            "perfect, thanks!! 谢谢", // the same text counts once
            "parcel2 is late",
        ];
        // "perfect" is in 2 distinct texts, "parcel" in 2 ("parcel2" splits at
        // the digit); "thanks" in 1; "is" is known; "谢谢" is not Latin.
        assert_eq!(missing_words(&texts, &vocab, 2), ["parcel", "perfect"]);
        assert_eq!(missing_words(&texts, &vocab, 3), Vec::<String>::new());

        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("vocab.txt");
        let mut lines = vocab.clone();
        lines.extend(["p", "##e", "##r", "##f", "##c", "##t", "##a", "##l"].map(String::from));
        std::fs::write(&base, lines.join("\n") + "\n").unwrap();
        let shape = |add_words| FreshModel {
            vocab: Some(base.clone()),
            hidden_size: 8,
            layers: 1,
            heads: 1,
            intermediate_size: 8,
            min_token_count: 1,
            add_words,
        };
        let scratch = dir.path().join("scratch.txt");
        let plain = fresh_tokenizer(&shape(None), &texts, &scratch).unwrap();
        let added = fresh_tokenizer(&shape(Some(2)), &texts, &scratch).unwrap();
        assert!(!scratch.exists(), "the scratch vocabulary is removed");
        let pieces = |tok: &Tokenizer| tok.encode("perfect", false).unwrap().get_tokens().to_vec();
        assert_eq!(
            pieces(&plain),
            ["p", "##e", "##r", "##f", "##e", "##c", "##t"]
        );
        assert_eq!(pieces(&added), ["perfect"]);
        assert_eq!(added.get_vocab_size(true), lines.len() + 2);
    }

    #[test]
    fn built_vocab_covers_every_character() {
        let vocab = build_vocab(&["快递到哪了 where is my parcel", "parcel 没到"], 2);
        assert_eq!(&vocab[..5], &["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]);
        for t in ["快", "w", "##w", "parcel"] {
            assert!(vocab.iter().any(|v| v == t), "{t} missing");
        }
        assert!(
            !vocab.iter().any(|v| v == "where"),
            "seen once, below min_count"
        );
    }
}
