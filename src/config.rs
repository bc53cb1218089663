//! `kefu serve`'s configuration: one clap struct, every field a flag and a
//! `KEFU_*` environment variable, with defaults that work from a checkout
//! after `make models`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use crate::classify::{BatchLimits, BertSettings};
use crate::device::{OnGpuFailure, Policy, Want};

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

    #[command(flatten)]
    pub generator: GeneratorArgs,

    #[command(flatten)]
    pub devices: DeviceArgs,

    /// Where conversations, profiles and escalations are kept (a sled
    /// database; created if missing).
    #[arg(long, env = "KEFU_DATA_DIR", default_value = "var/kefu")]
    pub data_dir: PathBuf,

    /// Prompt templates: `zh/` and `en/` with system, intents, user,
    /// clarify, escalate and fallback `.j2` files. Checked at start.
    #[arg(long, env = "KEFU_PROMPTS", default_value = "prompts")]
    pub prompts: PathBuf,

    /// Routing policy thresholds (TOML); fields left out keep the built-in
    /// defaults (see README).
    #[arg(long, env = "KEFU_POLICY")]
    pub policy: Option<PathBuf>,

    /// Customer messages handled at once. Past it SendMessage gets
    /// RESOURCE_EXHAUSTED at once and StreamMessage waits up to
    /// --stream-wait-ms. Higher admits more but each waits longer for the
    /// models.
    #[arg(long, env = "KEFU_MAX_INFLIGHT", default_value_t = 64)]
    pub max_inflight: usize,

    /// How long StreamMessage waits for a free slot before
    /// RESOURCE_EXHAUSTED, in milliseconds.
    #[arg(long, env = "KEFU_STREAM_WAIT_MS", default_value_t = 2000)]
    pub stream_wait_ms: u64,

    /// 0: every turn is flushed to disk before it is acknowledged. N > 0:
    /// turns wait for a shared flush every N ms (group commit): far fewer
    /// disk syncs under load, up to N ms more latency; still nothing is
    /// acknowledged before it is durable.
    #[arg(long, env = "KEFU_GROUP_COMMIT_MS", default_value_t = 0)]
    pub group_commit_ms: u64,

    /// Days without contact after which a customer is `dormant`.
    #[arg(long, env = "KEFU_DORMANT_DAYS", default_value_t = 60)]
    pub dormant_days: u64,

    /// Days after first contact during which a customer is `new`.
    #[arg(long, env = "KEFU_NEW_DAYS", default_value_t = 7)]
    pub new_days: u64,

    /// Shifts kefu's clock (for demos and tests of time-based segments).
    #[arg(
        long,
        env = "KEFU_CLOCK_OFFSET_SECS",
        default_value_t = 0,
        hide = true,
        allow_hyphen_values = true
    )]
    pub clock_offset_secs: i64,

    /// Longest customer message accepted, in bytes of UTF-8. Longer messages
    /// get INVALID_ARGUMENT; the classifiers read at most
    /// `--classify-windows` windows of `--max-seq-len` tokens of a message.
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

    /// TLS: the server certificate chain (PEM). With --tls-key, kefu serves
    /// gRPC over TLS; without both, plaintext (fine on loopback or behind a
    /// TLS-terminating proxy).
    #[arg(long, env = "KEFU_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS: the server's private key (PEM) for --tls-cert.
    #[arg(long, env = "KEFU_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Seconds that in-flight calls get to finish after SIGINT/SIGTERM;
    /// streams still open then (watches) are closed.
    #[arg(long, env = "KEFU_SHUTDOWN_GRACE_SECS", default_value_t = 10.0)]
    pub shutdown_grace_secs: f64,
}

/// The generative model that writes replies, and how it samples.
#[derive(Debug, Clone, Args)]
pub struct GeneratorArgs {
    /// A GGUF file or a Hugging Face model directory (safetensors). The
    /// default is the Qwen2.5 GGUF `make models` fetches (answers in Chinese).
    #[arg(
        long,
        env = "KEFU_GENERATOR_MODEL",
        default_value = "models/qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct.gguf"
    )]
    pub generator_model: PathBuf,

    /// Run without a generator: answers become the fallback replies from
    /// prompts/ and the conversation is escalated (classification, routing
    /// and storage still run).
    #[arg(long, env = "KEFU_NO_GENERATOR")]
    pub no_generator: bool,

    /// Run the generator on the CPU even when built with CUDA and a GPU is
    /// present.
    #[arg(long, env = "KEFU_GENERATOR_CPU")]
    pub generator_cpu: bool,

    /// Replies generated at once (mistral.rs batches them); the rest wait
    /// for a slot until their reply deadline. 0 chooses by device: 1 on the
    /// CPU (batched decode is slower in total there), 32 on a GPU.
    #[arg(long, env = "KEFU_GENERATOR_MAX_CONCURRENT", default_value_t = 0)]
    pub generator_max_concurrent: usize,

    /// Conversations whose KV cache mistral.rs keeps for reuse (0: off).
    #[arg(long, env = "KEFU_PREFIX_CACHE", default_value_t = 16)]
    pub prefix_cache: usize,

    /// Default sampling temperature; 0 is greedy (repeatable). Requests may
    /// override it within [0, 2].
    #[arg(long, env = "KEFU_TEMPERATURE", default_value_t = 0.3)]
    pub temperature: f32,

    /// Default nucleus sampling mass, (0, 1].
    #[arg(long, env = "KEFU_TOP_P", default_value_t = 0.9)]
    pub top_p: f32,

    /// Longest reply in tokens; also the cap for per-request overrides.
    #[arg(long, env = "KEFU_MAX_NEW_TOKENS", default_value_t = 160)]
    pub max_new_tokens: u32,

    /// Generation stops before this string (repeatable).
    #[arg(long = "stop", env = "KEFU_STOP", value_delimiter = ',')]
    pub stop: Vec<String>,

    /// Seconds a reply may take; past it the customer gets the fallback
    /// reply and a person takes over.
    #[arg(long, env = "KEFU_REPLY_TIMEOUT_SECS", default_value_t = 30.0)]
    pub reply_timeout_secs: f64,

    /// Tokens of recent conversation history put into the prompt.
    #[arg(long, env = "KEFU_HISTORY_TOKENS", default_value_t = 512)]
    pub history_tokens: usize,

    /// The shop's name, as the system prompt introduces the assistant.
    #[arg(long, env = "KEFU_SHOP_NAME", default_value = "kefu")]
    pub shop_name: String,
}

impl GeneratorArgs {
    pub fn with_model(model: PathBuf) -> Self {
        Self {
            generator_model: model,
            no_generator: false,
            generator_cpu: false,
            generator_max_concurrent: 0,
            prefix_cache: 16,
            temperature: 0.3,
            top_p: 0.9,
            max_new_tokens: 160,
            stop: Vec::new(),
            reply_timeout_secs: 30.0,
            history_tokens: 512,
            shop_name: "kefu".into(),
        }
    }

    pub fn reply_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.reply_timeout_secs.clamp(0.1, 3600.0))
    }
}

/// Where the models run. Every choice and its reason is logged at start.
#[derive(Debug, Clone, Default, Args)]
pub struct DeviceArgs {
    /// Device for both models: auto (the GPU when this kefu is built with
    /// CUDA and finds one), cpu, or cuda.
    #[arg(long, env = "KEFU_DEVICE", value_enum, default_value_t = Want::Auto)]
    pub device: Want,

    /// Device for the BERT classifiers only (overrides --device).
    #[arg(long, env = "KEFU_CLASSIFIER_DEVICE", value_enum)]
    pub classifier_device: Option<Want>,

    /// Device for the generator only (overrides --device; --generator-cpu
    /// is the same as `--generator-device cpu`).
    #[arg(long, env = "KEFU_GENERATOR_DEVICE", value_enum)]
    pub generator_device: Option<Want>,

    /// When the GPU was asked for or chosen and cannot be used (no device,
    /// a CPU-only build with --device cuda, out of memory while loading):
    /// cpu runs that model on the CPU, refuse stops kefu with the reason.
    #[arg(long, env = "KEFU_GPU_FALLBACK", value_enum, default_value_t = OnGpuFailure::Cpu)]
    pub gpu_fallback: OnGpuFailure,
}

impl DeviceArgs {
    pub fn classifier(&self) -> Policy {
        Policy {
            want: self.classifier_device.unwrap_or(self.device),
            on_failure: self.gpu_fallback,
        }
    }

    pub fn generator(&self, generator_cpu: bool) -> Policy {
        let want = if generator_cpu {
            Want::Cpu
        } else {
            self.generator_device.unwrap_or(self.device)
        };
        Policy {
            want,
            on_failure: self.gpu_fallback,
        }
    }
}

/// How the classifier threads batch work. Bigger batches raise throughput
/// under load and cost latency for the messages that wait for them.
#[derive(Debug, Clone, Args)]
pub struct ClassifierArgs {
    /// Longest input in tokens, [CLS] and [SEP] included (capped by each
    /// model's positions); longer texts are read in windows of this length.
    /// Attention cost grows with the square of this.
    #[arg(long, env = "KEFU_MAX_SEQ_LEN", default_value_t = 128)]
    pub max_seq_len: usize,

    /// Most windows a long message is read in, evenly spread over it, their
    /// probabilities averaged; 1 reads only its first --max-seq-len tokens.
    #[arg(long, env = "KEFU_CLASSIFY_WINDOWS", default_value_t = crate::classify::tokenizer::DEFAULT_WINDOWS)]
    pub classify_windows: usize,

    /// Most messages in one forward pass.
    #[arg(long, env = "KEFU_CLASSIFY_MAX_BATCH", default_value_t = 32)]
    pub max_batch: usize,

    /// Most padded tokens (rows x longest row) in one forward pass; bounds
    /// the memory of a batch.
    #[arg(long, env = "KEFU_CLASSIFY_MAX_BATCH_TOKENS", default_value_t = 4096)]
    pub max_batch_tokens: usize,

    /// Most messages waiting for each classifier (a long message takes one
    /// place per window); past it callers get RESOURCE_EXHAUSTED instead of
    /// an ever longer wait.
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
                windows: self.classify_windows.max(1),
            },
            device: Policy::default(),
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
            classify_windows: crate::classify::tokenizer::DEFAULT_WINDOWS,
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
            generator: GeneratorArgs::with_model(
                "models/qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct.gguf".into(),
            ),
            devices: DeviceArgs::default(),
            data_dir: "var/kefu".into(),
            prompts: "prompts".into(),
            policy: None,
            max_inflight: 64,
            stream_wait_ms: 2000,
            group_commit_ms: 0,
            dormant_days: 60,
            new_days: 7,
            clock_offset_secs: 0,
            max_text_bytes: 4000,
            max_classify_texts: 64,
            shutdown_grace_secs: 1.0,
            keys_file: None,
            api_keys: None,
            tls_cert: None,
            tls_key: None,
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
