//! The `kefu` command line: one clap tree, each subcommand a thin call into
//! the library.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::classify::checkpoint::Checkpoint;
use crate::classify::train::{self, FreshModel, Init, RunOptions, TrainOptions};
use crate::classify::{self, LabelMap, Language, Task};
use crate::config::ServeArgs;
use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "kefu",
    version,
    about = "kefu (客服): an AI customer-service agent for e-commerce, served over gRPC",
    long_about = "kefu classifies every customer message (sentiment and intent, with BERT run by \
                  candle), routes it, answers it and remembers it. `kefu serve` runs the gRPC \
                  service; the other commands train, evaluate and try the models."
)]
pub struct Cli {
    /// Log output: human-readable text or one JSON object per event.
    #[arg(long, env = "KEFU_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `kefu=debug,tonic=info` (RUST_LOG syntax;
    /// RUST_LOG is read when this is unset).
    #[arg(long, env = "KEFU_LOG", global = true)]
    pub log: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC service (ChatService, AgentService, MarketingService,
    /// AdminService, health and reflection).
    Serve(Box<ServeArgs>),
    /// Classify texts with one checkpoint and print one JSON line per text.
    Classify(ClassifyArgs),
    /// Train a sentiment or intent classifier and write a Hugging Face
    /// checkpoint.
    Train(TrainArgs),
    /// Masked-language-model pretraining of a fresh BERT on unlabelled text;
    /// writes a BertForMaskedLM checkpoint for `kefu train --init`.
    Pretrain(PretrainArgs),
    /// Accuracy, macro-F1, per-label precision/recall and the confusion
    /// matrix of a checkpoint on labelled JSONL.
    Eval(EvalArgs),
    /// Try a generative model: render kefu's prompts for a message and print
    /// the reply (whole, or token by token with --stream).
    Generate(GenerateArgs),
    /// Talk to a running kefu as a customer: replies stream in, and the
    /// routing decision is shown under each.
    Chat(crate::service::client::ChatArgs),
    /// Ask a running kefu whether it serves (gRPC health): exits 0 once it
    /// is SERVING, 1 if it is not by the end of --wait. For scripts and
    /// container probes.
    Health(crate::service::client::HealthArgs),
    /// Write the label corrections agents made when resolving escalations as
    /// training JSONL for `kefu train` (run it while the server is stopped:
    /// the store admits one process at a time).
    ExportCorrections(ExportCorrectionsArgs),
    /// Measure speed and memory next to a peer (see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Classifier messages/s at batch 1 and 32, short and long texts, and
    /// peak memory, next to PyTorch transformers on the same checkpoint.
    Classify(crate::bench::ClassifyBenchArgs),
    /// Generation speed (prompt tokens/s, decode tokens/s, time to first
    /// token) of the default GGUF models, next to llama.cpp.
    Generate(crate::bench::GenerateBenchArgs),
    /// Messages/s and p50/p99 latency of a running server: the
    /// classify-only route and the full route at 1, 8 and 64 clients.
    Chat(crate::service::client::ChatBenchArgs),
}

#[derive(Debug, Args)]
pub struct ExportCorrectionsArgs {
    /// kefu's data directory (`--data-dir` of `kefu serve`).
    #[arg(long, env = "KEFU_DATA_DIR", default_value = "var/kefu")]
    pub data_dir: PathBuf,
    /// Which labels to export: one JSONL file trains one task.
    #[arg(long, value_enum)]
    pub task: Task,
    /// Output file; `-` writes to stdout.
    #[arg(long, default_value = "-")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct ClassifyArgs {
    /// A `BertForSequenceClassification` checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Texts to classify; with none, one text per line is read from stdin.
    pub texts: Vec<String>,
    /// Longest input in tokens, [CLS] and [SEP] included (capped by the
    /// model's positions); longer texts are read in windows of this length.
    #[arg(long, default_value_t = 128)]
    pub max_seq_len: usize,
    /// Most windows a long text is read in, their probabilities averaged;
    /// 1 reads only its first --max-seq-len tokens.
    #[arg(long, default_value_t = classify::tokenizer::DEFAULT_WINDOWS)]
    pub windows: usize,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// What to predict; fixes the label set.
    #[arg(long, value_enum)]
    pub task: Task,
    /// Training examples, JSONL with `text` and `label`.
    #[arg(long)]
    pub data: PathBuf,
    /// Dev examples for picking the best epoch (never trained on).
    #[arg(long)]
    pub dev: PathBuf,
    /// Where to write the checkpoint; replaced atomically by each better epoch.
    #[arg(long)]
    pub out: PathBuf,
    /// Fine-tune this checkpoint directory (e.g. bert-base-chinese, or one
    /// written by `kefu pretrain`).
    #[arg(long, conflicts_with = "config")]
    pub init: Option<PathBuf>,
    /// Train a fresh small BERT from scratch with the --hidden-size,
    /// --layers, --heads, --intermediate-size and --vocab below.
    #[arg(long)]
    pub config: bool,
    #[command(flatten)]
    pub shape: ShapeArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// For training lines that carry a teacher's `probabilities`, the share
    /// of the target that is the teacher's distribution; the rest is the
    /// gold label (0 ignores them).
    #[arg(long, default_value_t = 0.5, value_parser = unit_interval)]
    pub soft_weight: f64,
    /// Train on up to this many windows of each text longer than
    /// --max-seq-len, each a row with the text's label, and read dev texts
    /// in as many windows as the service does (1: only each text's first
    /// tokens, truncated).
    #[arg(long, default_value_t = 1)]
    pub windows: usize,
}

fn unit_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(w) if (0.0..=1.0).contains(&w) => Ok(w),
        Ok(w) => Err(format!("{w} is not between 0 and 1")),
        Err(e) => Err(e.to_string()),
    }
}

/// The shape of a fresh BERT.
#[derive(Debug, Args)]
pub struct ShapeArgs {
    /// WordPiece vocab.txt for a fresh model (e.g. bert-base-chinese's);
    /// without it a vocabulary is built from the training text.
    #[arg(long)]
    pub vocab: Option<PathBuf>,
    #[arg(long, default_value_t = 256)]
    pub hidden_size: usize,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 1024)]
    pub intermediate_size: usize,
    /// Tokens seen fewer times are left out of a built vocabulary.
    #[arg(long, default_value_t = 3)]
    pub min_token_count: usize,
    /// With --vocab: also add every whole word of 2+ Latin letters that at
    /// least N distinct training texts use and the vocabulary lacks
    /// (bert-base-chinese's cuts "perfect" into pe ##rf ##ect).
    #[arg(long, value_name = "N", requires = "vocab", value_parser = clap::value_parser!(u64).range(1..))]
    pub add_words: Option<u64>,
}

impl ShapeArgs {
    fn fresh(&self) -> FreshModel {
        FreshModel {
            vocab: self.vocab.clone(),
            hidden_size: self.hidden_size,
            layers: self.layers,
            heads: self.heads,
            intermediate_size: self.intermediate_size,
            min_token_count: self.min_token_count,
            add_words: self.add_words.map(|n| n as usize),
        }
    }
}

/// How a training run goes.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Peak learning rate (2e-5..5e-5 for fine-tuning, ~5e-4 from scratch).
    #[arg(long, default_value_t = 5e-4)]
    pub learning_rate: f64,
    /// Fraction of steps spent warming the learning rate up.
    #[arg(long, default_value_t = 0.1)]
    pub warmup_ratio: f64,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Longest input in tokens during training.
    #[arg(long, default_value_t = 128)]
    pub max_seq_len: usize,
    /// Stop after this many optimiser steps (smoke runs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Save weights in f16: half the size, logits within ~1e-3.
    #[arg(long)]
    pub half: bool,
    /// Pick and save an exponential moving average of the weights, with
    /// this decay per step (e.g. 0.999: about the last 1,000 steps), instead
    /// of the weights at the end of each epoch.
    #[arg(long, value_name = "DECAY")]
    pub average: Option<f64>,
    /// Print the training report as JSON on stdout at the end.
    #[arg(long)]
    pub json: bool,
}

impl RunArgs {
    fn options(&self) -> RunOptions {
        RunOptions {
            epochs: self.epochs,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            warmup_ratio: self.warmup_ratio,
            weight_decay: self.weight_decay,
            seed: self.seed,
            max_len: self.max_seq_len,
            max_steps: self.max_steps,
            half: self.half,
            average: self.average,
            progress: true,
        }
    }
}

#[derive(Debug, Args)]
pub struct PretrainArgs {
    /// Unlabelled texts: JSONL files (their `text` fields) or plain text, one
    /// text per line (repeatable).
    #[arg(long, required = true)]
    pub data: Vec<PathBuf>,
    /// Held-out texts for picking the best epoch by masked-token accuracy
    /// (repeatable).
    #[arg(long, required = true)]
    pub dev: Vec<PathBuf>,
    /// Where to write the BertForMaskedLM checkpoint.
    #[arg(long)]
    pub out: PathBuf,
    /// Fraction of the tokens the model must restore.
    #[arg(long, default_value_t = 0.15)]
    pub mask_prob: f64,
    #[command(flatten)]
    pub shape: ShapeArgs,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A GGUF file, or a Hugging Face model directory with safetensors.
    #[arg(
        long,
        default_value = "models/qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct.gguf"
    )]
    pub model: PathBuf,
    /// The customer's message.
    pub message: String,
    /// Print the reply as it is generated.
    #[arg(long)]
    pub stream: bool,
    /// The intent whose instructions go into the system prompt.
    #[arg(long, default_value = "other")]
    pub intent: String,
    /// Prompt templates directory.
    #[arg(long, default_value = "prompts")]
    pub prompts: PathBuf,
    /// Sampling temperature; 0 is greedy (repeatable).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    #[arg(long, default_value_t = 160)]
    pub max_new_tokens: u32,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    pub timeout_secs: f64,
    /// Run on the CPU even when built with CUDA and a GPU is present.
    #[arg(long)]
    pub cpu: bool,
    /// Print the rendered prompt messages to stderr first.
    #[arg(long)]
    pub show_prompt: bool,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A `BertForSequenceClassification` checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Labelled examples, JSONL with `text` and `label`.
    #[arg(long)]
    pub data: PathBuf,
    /// Print one JSON object (accuracy, macro_f1, n, per_label, confusion).
    #[arg(long)]
    pub json: bool,
    /// Longest input in tokens, [CLS] and [SEP] included (capped by the
    /// model's positions); longer texts are read in windows of this length.
    #[arg(long, default_value_t = 128)]
    pub max_seq_len: usize,
    /// Most windows a long text is read in, their probabilities averaged, as
    /// the service reads it; 1 reads only its first --max-seq-len tokens.
    #[arg(long, default_value_t = classify::tokenizer::DEFAULT_WINDOWS)]
    pub windows: usize,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            tracing::info!(config = ?args, "effective configuration");
            crate::service::serve(*args, shutdown_signal()).await?;
            tracing::info!("kefu stopped");
            Ok(())
        }
        Command::Classify(args) => tokio::task::spawn_blocking(move || classify_cmd(args)).await?,
        Command::Train(args) => tokio::task::spawn_blocking(move || train_cmd(args)).await?,
        Command::Pretrain(args) => tokio::task::spawn_blocking(move || pretrain_cmd(args)).await?,
        Command::Eval(args) => tokio::task::spawn_blocking(move || eval_cmd(args)).await?,
        Command::Generate(args) => generate_cmd(args).await,
        Command::Bench(BenchCommand::Generate(args)) => crate::bench::generate(&args).await,
        Command::Bench(BenchCommand::Chat(args)) => crate::service::client::bench(args).await,
        Command::Chat(args) => crate::service::client::chat(args).await,
        Command::Health(args) => crate::service::client::health(args).await,
        Command::ExportCorrections(args) => {
            tokio::task::spawn_blocking(move || export_corrections_cmd(args)).await?
        }
        Command::Bench(BenchCommand::Classify(args)) => {
            tokio::task::spawn_blocking(move || crate::bench::classify(&args)).await?
        }
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

fn classify_cmd(args: ClassifyArgs) -> anyhow::Result<()> {
    let device = candle_core::Device::Cpu;
    let ckpt = Checkpoint::load(&args.model, args.max_seq_len, &device)?;
    let texts: Vec<String> = if args.texts.is_empty() {
        std::io::stdin()
            .lock()
            .lines()
            .collect::<Result<Vec<_>, _>>()
            .context("reading stdin")?
            .into_iter()
            .filter(|l| !l.trim().is_empty())
            .collect()
    } else {
        args.texts
    };
    let mut out = std::io::stdout().lock();
    for chunk in texts.chunks(32) {
        let probs = classify::worker::classify_texts(
            &ckpt.model,
            &ckpt.tokenizer,
            chunk,
            args.windows,
            32,
            &device,
        )?;
        for (text, p) in chunk.iter().zip(probs) {
            let mut scores: Vec<(String, f32)> = ckpt.labels.iter().cloned().zip(p).collect();
            scores.sort_by(|a, b| b.1.total_cmp(&a.1));
            let line = serde_json::json!({
                "text": text,
                "label": scores[0].0,
                "probability": scores[0].1,
                "probabilities": scores.iter().map(|(l, p)| serde_json::json!({"label": l, "probability": p})).collect::<Vec<_>>(),
                "language": Language::detect(text),
            });
            writeln!(out, "{line}")?;
        }
    }
    Ok(())
}

fn train_cmd(args: TrainArgs) -> anyhow::Result<()> {
    let init = match (&args.init, args.config) {
        (Some(dir), _) => Init::Pretrained(dir.clone()),
        (None, true) => Init::Fresh(args.shape.fresh()),
        (None, false) => anyhow::bail!(
            "say where the model starts: --init DIR to fine-tune a checkpoint, or --config for a fresh BERT"
        ),
    };
    let run = &args.run;
    let opts = TrainOptions {
        task: args.task,
        data: args.data,
        dev: args.dev,
        out: args.out.clone(),
        init,
        run: run.options(),
        soft_weight: args.soft_weight,
        windows: args.windows.max(1),
    };
    let report = train::train(&opts)?.report;
    eprintln!(
        "best dev accuracy {:.4} at epoch {} after {} steps; checkpoint in {}",
        report.best_dev_accuracy,
        report.best_epoch,
        report.steps,
        args.out.display()
    );
    if run.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

fn pretrain_cmd(args: PretrainArgs) -> anyhow::Result<()> {
    let run = &args.run;
    let opts = crate::classify::pretrain::PretrainOptions {
        data: args.data.clone(),
        dev: args.dev.clone(),
        out: args.out.clone(),
        shape: args.shape.fresh(),
        mask_prob: args.mask_prob,
        run: run.options(),
    };
    let report = crate::classify::pretrain::pretrain(&opts)?;
    eprintln!(
        "best dev masked-token accuracy {:.4} at epoch {} after {} steps; checkpoint in {} \
         (fine-tune it with `kefu train --init {}`)",
        report.best_dev_accuracy,
        report.best_epoch,
        report.steps,
        args.out.display(),
        args.out.display()
    );
    if run.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

fn export_corrections_cmd(args: ExportCorrectionsArgs) -> anyhow::Result<()> {
    let store = crate::store::Store::open(&args.data_dir).with_context(|| {
        format!(
            "cannot open {} (a running kefu holds it; stop it first)",
            args.data_dir.display()
        )
    })?;
    let mut out: Box<dyn Write> = if args.out.as_os_str() == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::io::BufWriter::new(
            std::fs::File::create(&args.out)
                .with_context(|| format!("cannot write {}", args.out.display()))?,
        ))
    };
    let n = export_corrections(&store, args.task, &mut out)?;
    out.flush()?;
    eprintln!("{n} {} corrections exported", args.task.name());
    Ok(())
}

/// Writes agents' corrections for `task` as `{"text", "label"}` lines;
/// returns how many.
pub fn export_corrections(
    store: &crate::store::Store,
    task: Task,
    out: &mut dyn Write,
) -> anyhow::Result<usize> {
    let mut n = 0;
    for record in store.corrections() {
        let record = record?;
        let label = match task {
            Task::Intent => &record.intent,
            Task::Sentiment => &record.sentiment,
        };
        if label.is_empty() {
            continue;
        }
        writeln!(
            out,
            "{}",
            serde_json::json!({"text": record.text, "label": label})
        )?;
        n += 1;
    }
    Ok(n)
}

fn eval_cmd(args: EvalArgs) -> anyhow::Result<()> {
    let ckpt = Checkpoint::load(&args.model, args.max_seq_len, &candle_core::Device::Cpu)?;
    // Reject checkpoints whose labels kefu would not understand, with the
    // same rule the server applies.
    LabelMap::new(Task::Sentiment, &ckpt.labels, &args.model)
        .or_else(|_| LabelMap::new(Task::Intent, &ckpt.labels, &args.model))?;
    let metrics = train::evaluate(&ckpt, &args.data, 64, args.windows)?;
    if args.json {
        println!("{}", serde_json::to_string(&metrics)?);
    } else {
        print!("{}", metrics.render());
    }
    Ok(())
}

async fn generate_cmd(args: GenerateArgs) -> anyhow::Result<()> {
    use crate::device::{Policy, Want};
    use crate::generate::mistral::{MistralGenerator, Options};
    use crate::generate::prompt::{PromptContext, PromptSettings, Prompts};
    use crate::generate::{Event, Generator, Request, Sampling};

    if !classify::INTENT_LABELS.contains(&args.intent.as_str()) {
        anyhow::bail!(
            "--intent {:?} is not one of {}",
            args.intent,
            classify::INTENT_LABELS.join(", ")
        );
    }
    let prompts = Prompts::load(&args.prompts, PromptSettings::default())?;
    let generator = MistralGenerator::load(
        &args.model,
        &Options {
            device: Policy {
                want: if args.cpu { Want::Cpu } else { Want::Auto },
                ..Policy::default()
            },
            ..Options::default()
        },
    )
    .await?;
    let language = Language::detect(&args.message);
    let mut ctx = PromptContext::sample(language, &args.intent);
    ctx.message = args.message.clone();
    ctx.history.clear();
    ctx.profile.clear();
    ctx.order_id.clear();
    let request = Request {
        messages: prompts.messages(&ctx)?,
        sampling: Sampling {
            temperature: args.temperature,
            top_p: args.top_p,
            max_new_tokens: args.max_new_tokens,
            stop: args.stop.clone(),
        },
        deadline: std::time::Instant::now() + std::time::Duration::from_secs_f64(args.timeout_secs),
    };
    if args.show_prompt {
        for m in &request.messages {
            eprintln!("--- {:?}\n{}", m.role, m.content);
        }
        eprintln!("---");
    }
    let started = std::time::Instant::now();
    let mut first: Option<f64> = None;
    let mut stream = generator.stream(request).await?;
    let mut out = std::io::stdout();
    let mut text = String::new();
    let usage = loop {
        match stream.recv().await {
            Some(Ok(Event::Delta(d))) => {
                first.get_or_insert(started.elapsed().as_secs_f64());
                if args.stream {
                    write!(out, "{d}")?;
                    out.flush()?;
                }
                text.push_str(&d);
            }
            Some(Ok(Event::Done(u))) => break u,
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("the generator stopped without finishing the reply"),
        }
    };
    if args.stream {
        writeln!(out)?;
    } else {
        writeln!(out, "{text}")?;
    }
    eprintln!(
        "[{} | {} prompt tokens at {:.1}/s, {} generated at {:.1}/s, first token after {:.2} s, finish: {}]",
        generator.device(),
        usage.prompt_tokens,
        usage.prompt_tokens_per_second,
        usage.completion_tokens,
        usage.completion_tokens_per_second,
        first.unwrap_or(0.0),
        usage.finish_reason
    );
    Ok(())
}
