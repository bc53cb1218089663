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

/// How a Chinese message is written. kefu answers in the customer's script:
/// customers in Taiwan, Hong Kong and Macau write Traditional characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Script {
    Simplified,
    Traditional,
}

impl Script {
    /// The script a text's characters show: Traditional when it has more
    /// characters only Traditional writing uses (們, 這, 還, 貨...) than
    /// characters only Simplified writing uses (们, 这, 还, 货...);
    /// `None` when neither shows ("好的", "ok", "在嗎在吗").
    pub fn detect(text: &str) -> Option<Self> {
        let (mut simplified, mut traditional) = (0usize, 0usize);
        for c in text.chars().filter(|&c| is_han(c)) {
            if SIMPLIFIED_ONLY.iter().any(|s| s.contains(c)) {
                simplified += 1;
            } else if TRADITIONAL_ONLY.iter().any(|s| s.contains(c)) {
                traditional += 1;
            }
        }
        match traditional.cmp(&simplified) {
            std::cmp::Ordering::Greater => Some(Script::Traditional),
            std::cmp::Ordering::Less => Some(Script::Simplified),
            std::cmp::Ordering::Equal => None,
        }
    }

    /// The script a locale names: zh-TW, zh-HK, zh-MO and zh-Hant are
    /// Traditional; zh-CN, zh-SG and zh-Hans Simplified; `None` otherwise.
    pub fn of_locale(locale: &str) -> Option<Self> {
        let l = locale.to_ascii_lowercase().replace('_', "-");
        let mut parts = l.split('-');
        if parts.next() != Some("zh") {
            return None;
        }
        for part in parts {
            match part {
                "hant" | "tw" | "hk" | "mo" => return Some(Script::Traditional),
                "hans" | "cn" | "sg" => return Some(Script::Simplified),
                _ => {}
            }
        }
        None
    }
}

/// The 391 characters with a distinct Traditional form that kefu's Chinese
/// data uses most, less those Taiwan and Hong Kong customers write too (台,
/// 里, 吃...). From OpenCC's tables (Apache-2.0), ranked by frequency in
/// `data/`.
const SIMPLIFIED_ONLY: &[&str] = &[
    "万与专业东丝丢两严个丰临为丽么义乐习书买乱争于云产亲仅从仓们价优会传伤体余偿儿关",
    "兴养内册写冲决况冻净准减凑几则刚别办务动劲区医华单卖卫却厂厅历厉压参双发变叶号后",
    "吗听启呗员响团园围国图场坏块坚垫墙声壳处备复够头妈学宝实宽宾对导将尔尽层属岁师帐",
    "带帮干并广库应开异张强当录怀态总恶惊惯愿戏户托扫扰抢护报担择挂损换据携摄数断无旧",
    "时显晕术机杂权条来极柜标样梦检楼欢毕气没洁浅测济温湿满灯灵点烂烟烦烫热爱状独猫环",
    "现电画畅盖盘码确礼离种积称税稳笔签简类粮紧红约级纯纸纹线细终绍经绒结给络绝统续维",
    "网职联胶脏脑脚脸节荐营蓝虑虚虽蛮补装裤见观规视觉触计订认让议记讲许论设证评识诉词",
    "试诚话询该详语误说请读谁调谓谢谱负责败账货质购贴贵费资赔赞赠赶车转软轻载较边达过",
    "运还这进远连迹适选递遗邮采释钟钢钱铁银铺链销锅错键镜长门闭问间闷闹阅阳际陈险随难",
    "静页顶项顺须顾预领频颗题颜额风飞饭饮馆馈马驱驿验骗鱼鲜鸡黄齐龙",
];

/// The 400 Traditional forms of Simplified characters that kefu's Chinese
/// data, written in Taiwan's and Hong Kong's usage, uses most.
const TRADITIONAL_ONLY: &[&str] = &[
    "丟並乾亂來倉個們備傢傳傷僅價優兒內兩凍別則剛劃勁動務區卻厲參員唄問啟單嗎噹嚴國圍",
    "園圖團執堅報場塊墊壓壞夠媽學實寫寬寶將專對導層屬師帳帶幫幹幾庫廠廣廳張強後從復悶",
    "愛態慣慮憶應懷戲戶掃掛換損搶擇擔據擾攜攝敗數斷於時暢書會東條業極樂樓標樣機檢櫃權",
    "歡歲歷殼氣決沒況淨淺減測湊準溫滿潔濟為無煙煩熱燈燙營爛爭爾牀牆獨現環產畢畫異當發",
    "盡盤確碼禮種稱積穩筆節簡簽糧約紅紋純紙級細紹終結絕絡給絨統絲經維網緊線緻總繫續義",
    "習聯聲職聽腦腳膠臉臨臺與興舊華萬葉蓋薦藍處號螢術衛衝裏補裝裡製複褲見規視親覺觀觸",
    "訂計訊記設許訴註評詞詢試話該詳認語誠誤說説誰調請論謂講謝證識譜議護讀變讓豐貓負貨",
    "責貴買費貼資賓賣質賬購贈贊趕車軟較載輕轉辦這連週進遊運過達遞遠適選遺還邊郵醫釋銀",
    "銷鋪鋼錄錢錯鍋鍵鏈鏡鐘鐵長門開間閱閲闆關陳陽際隨險隻雖雙雜雞離難電靈靜響頁順須預",
    "領頭頻顆題額顏願類顧顯風飛飯飲養餘館饋馬騙驅驗驚驛髒體髮鬆鬧鬱魚鮮麗麼黃點黴齊龍",
];

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
    fn script_follows_the_characters_only_one_writing_uses() {
        assert_eq!(
            Script::detect("我的貨什麼時候到？"),
            Some(Script::Traditional)
        );
        assert_eq!(
            Script::detect("退款幾時會返嚟呀"),
            Some(Script::Traditional)
        );
        assert_eq!(
            Script::detect("我的货什么时候到？"),
            Some(Script::Simplified)
        );
        // 台 and 里 are written in Taiwan too; 們 outweighs them.
        assert_eq!(
            Script::detect("台北哪裡可以取貨，我們住在里港"),
            Some(Script::Traditional)
        );
        for neither in ["好的", "ok thanks", "在吗在嗎", "👍", ""] {
            assert_eq!(Script::detect(neither), None, "{neither}");
        }
    }

    #[test]
    fn script_of_a_locale() {
        for (locale, script) in [
            ("zh-TW", Some(Script::Traditional)),
            ("zh_HK", Some(Script::Traditional)),
            ("zh-Hant-MO", Some(Script::Traditional)),
            ("zh-CN", Some(Script::Simplified)),
            ("zh-Hans", Some(Script::Simplified)),
            ("zh", None),
            ("en-US", None),
            ("", None),
        ] {
            assert_eq!(Script::of_locale(locale), script, "{locale}");
        }
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
