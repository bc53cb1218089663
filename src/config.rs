//! `kefu serve`'s configuration: one clap struct, every field a flag and a
//! `KEFU_*` environment variable, with defaults that work from a checkout
//! after `make models`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use crate::classify::{BatchLimits, BertSettings};

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on. The default only accepts local connections.
    #[arg(long, env = "KEFU_ADDR", default_value = "127.0.0.1:50051")]
    pub addr: SocketAddr,

    /// Sentiment classifier: a Hugging Face `BertForSequenceClassification`
    /// directory whose labels are negative/neutral/positive (or a subset).
    #[arg(long, env = "KEFU_SENTIMENT_MODEL", default_value = "models/sentiment")]
    pub sentiment_model: PathBuf,

    /// Intent classifier: a Hugging Face `BertForSequenceClassification`
    /// directory with kefu's intent labels.
    #[arg(long, env = "KEFU_INTENT_MODEL", default_value = "models/intent")]
    pub intent_model: PathBuf,

    #[command(flatten)]
    pub classifier: ClassifierArgs,

    /// Longest customer message accepted, in bytes of UTF-8. Longer messages
    /// get INVALID_ARGUMENT; the classifier only reads the first
    /// `--max-seq-len` tokens anyway.
    #[arg(long, env = "KEFU_MAX_TEXT_BYTES", default_value_t = 4000)]
    pub max_text_bytes: usize,

    /// Most texts in one Classify call.
    #[arg(long, env = "KEFU_MAX_CLASSIFY_TEXTS", default_value_t = 64)]
    pub max_classify_texts: usize,

    /// API keys file: one `role sha256-hex` line per key (roles: platform,
    /// agent, marketing, admin). Without any keys kefu admits every call and
    /// only listens on loopback.
    #[arg(long, env = "KEFU_KEYS_FILE")]
    pub keys_file: Option<PathBuf>,

    /// API keys as `role:key` pairs separated by commas (each key at least
    /// 16 characters). Prefer --keys-file: it holds hashes only.
    #[arg(long, env = "KEFU_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<Secret>,

    /// Seconds that in-flight calls get to finish after SIGINT/SIGTERM;
    /// streams still open then (watches) are closed.
    #[arg(long, env = "KEFU_SHUTDOWN_GRACE_SECS", default_value_t = 10.0)]
    pub shutdown_grace_secs: f64,
}

/// How the classifier threads batch work. Bigger batches raise throughput
/// under load and cost latency for the messages that wait for them.
#[derive(Debug, Clone, Args)]
pub struct ClassifierArgs {
    /// Longest input in tokens, [CLS] and [SEP] included; longer texts are
    /// truncated. Attention cost grows with the square of this.
    #[arg(long, env = "KEFU_MAX_SEQ_LEN", default_value_t = 128)]
    pub max_seq_len: usize,

    /// Most messages in one forward pass.
    #[arg(long, env = "KEFU_CLASSIFY_MAX_BATCH", default_value_t = 32)]
    pub max_batch: usize,

    /// Most padded tokens (rows x longest row) in one forward pass; bounds
    /// the memory of a batch.
    #[arg(long, env = "KEFU_CLASSIFY_MAX_BATCH_TOKENS", default_value_t = 4096)]
    pub max_batch_tokens: usize,

    /// Most messages waiting for each classifier; past it callers get
    /// RESOURCE_EXHAUSTED instead of an ever longer wait.
    #[arg(long, env = "KEFU_CLASSIFY_QUEUE", default_value_t = 1024)]
    pub queue: usize,
}

impl ClassifierArgs {
    pub fn settings(&self) -> BertSettings {
        BertSettings {
            max_len: self.max_seq_len.max(2),
            limits: BatchLimits {
                max_batch: self.max_batch.max(1),
                max_batch_tokens: self.max_batch_tokens.max(self.max_seq_len),
                queue: self.queue.max(1),
            },
        }
    }
}

impl Default for ClassifierArgs {
    fn default() -> Self {
        Self {
            max_seq_len: 128,
            max_batch: 32,
            max_batch_tokens: 4096,
            queue: 1024,
        }
    }
}

impl ServeArgs {
    /// Defaults with the given model directories, for tests and embedding.
    pub fn with_models(sentiment: PathBuf, intent: PathBuf) -> Self {
        Self {
            addr: "127.0.0.1:0".parse().expect("static address"),
            sentiment_model: sentiment,
            intent_model: intent,
            classifier: ClassifierArgs::default(),
            max_text_bytes: 4000,
            max_classify_texts: 64,
            shutdown_grace_secs: 1.0,
            keys_file: None,
            api_keys: None,
        }
    }

    pub fn shutdown_grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.shutdown_grace_secs.clamp(0.0, 3600.0))
    }
}

/// A configuration value that must never reach a log.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_in_the_printed_config() {
        let mut args = ServeArgs::with_models("s".into(), "i".into());
        args.api_keys = Some(Secret("platform:very-secret-key-123".into()));
        let printed = format!("{args:?}");
        assert!(!printed.contains("very-secret"), "{printed}");
        assert!(printed.contains("[redacted]"));
    }
}
