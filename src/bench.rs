//! `kefu bench`: speed and memory measured the same way for kefu and for the
//! peer it is compared with, in one run, so the ratio is not skewed by a
//! machine that got busier between two runs. Timing lives here, never in
//! tests.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::classify::checkpoint::Checkpoint;
use crate::classify::device_label;
use crate::classify::tokenizer;
use crate::classify::worker::{pad_id, probabilities};
use crate::device::{OnGpuFailure, Policy, Want};

#[derive(Debug, Clone, clap::Args)]
pub struct ClassifyBenchArgs {
    /// Checkpoint to measure.
    #[arg(long, default_value = "models/sentiment")]
    pub model: PathBuf,
    /// Threads for both kefu (RAYON_NUM_THREADS) and PyTorch
    /// (torch.set_num_threads).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Seconds per case.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Python with torch and transformers; empty skips the PyTorch side.
    #[arg(long, env = "KEFU_BENCH_PYTHON", default_value = "python3")]
    pub torch_python: String,
    /// Batch sizes to measure, each with short and long texts.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub batches: Vec<usize>,
    /// Where kefu's side runs (cuda needs a `make build-cuda` binary). The
    /// PyTorch side always runs on the CPU.
    #[arg(long, value_enum, default_value_t = Want::Cpu)]
    pub device: Want,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Case {
    name: String,
    batch: usize,
    texts: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseResult {
    pub name: String,
    pub batch: usize,
    pub messages_per_second: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FrameworkResult {
    pub framework: String,
    pub results: Vec<CaseResult>,
    pub peak_rss_mb: f64,
}

/// Short chat messages (~20 characters) and long ones (~128 tokens), zh and
/// en, as customers send them.
fn cases(batches: &[usize]) -> Vec<Case> {
    let short = [
        "我的快递到哪了，怎么还没到啊？",
        "这件衣服有没有XL码的？",
        "退款什么时候能到账呢",
        "Where is my parcel? Order 88231",
        "优惠券怎么用不了了😡",
        "转人工，我要投诉快递员",
        "Can I change the delivery address?",
        "发票抬头开错了能重开吗",
    ];
    let long_zh = "上周五在你们店里买的那台空气净化器今天终于到了，但是打开包装发现外壳有一道很明显的裂痕，\
                   而且开机以后噪音特别大，跟详情页写的静音效果完全不一样。我联系了快递，快递说是你们发货前就有问题，\
                   你们客服又说是运输造成的，来回踢皮球已经三天了，到现在都没人给我一个明确的处理方案，请问到底能不能退货退款？";
    let long_en = "I ordered the wireless headphones during the sale last Friday and they arrived today, but the left \
                   ear cup does not charge at all and the box looked like it had been opened before. I have tried \
                   two different cables and the charging case still shows no light. Your courier says it is not \
                   their problem and the chat bot keeps sending me the same link. I would like to know whether I \
                   can get a replacement quickly or a full refund, because this was meant to be a birthday present.";
    let make = |base: &[&str], n: usize| -> Vec<String> {
        (0..n)
            .map(|i| format!("{}{}", base[i % base.len()], " ".repeat(i / base.len())))
            .collect()
    };
    let mut out = Vec::new();
    for (name, base) in [("short", &short[..]), ("long", &[long_zh, long_en][..])] {
        for &batch in batches {
            let batch = batch.max(1);
            out.push(Case {
                name: name.into(),
                batch,
                texts: make(base, batch.max(64)),
            });
        }
    }
    out
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn run_kefu(args: &ClassifyBenchArgs, cases: &[Case]) -> anyhow::Result<FrameworkResult> {
    // candle sizes its matmul thread pool from this variable.
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    let policy = Policy {
        want: args.device,
        on_failure: OnGpuFailure::Refuse,
    };
    let (device, reason) = crate::classify::place(policy)?;
    eprintln!("bench: kefu on {} ({reason})", device_label(&device));
    let ckpt = Checkpoint::load(&args.model, 128, &device)?;
    let pad = pad_id(&ckpt.tokenizer);
    let mut results = Vec::new();
    for case in cases {
        let batches: Vec<&[String]> = case.texts.chunks(case.batch).collect();
        // The whole request path: tokenize, pad, forward, softmax.
        let run = |b: &[String]| -> anyhow::Result<()> {
            let ids = b
                .iter()
                .map(|t| tokenizer::encode(&ckpt.tokenizer, t))
                .collect::<Result<Vec<_>, _>>()?;
            let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
            probabilities(&ckpt.model, &rows, pad, &device)?;
            Ok(())
        };
        run(batches[0])?;
        let (mut done, mut i, start) = (0usize, 0usize, Instant::now());
        while start.elapsed() < Duration::from_secs_f64(args.seconds) {
            let b = batches[i % batches.len()];
            run(b)?;
            done += b.len();
            i += 1;
        }
        results.push(CaseResult {
            name: case.name.clone(),
            batch: case.batch,
            messages_per_second: done as f64 / start.elapsed().as_secs_f64(),
        });
    }
    Ok(FrameworkResult {
        framework: format!(
            "kefu {} (candle 0.10, {})",
            env!("CARGO_PKG_VERSION"),
            device_label(&device)
        ),
        results,
        peak_rss_mb: peak_rss_mb(),
    })
}

/// Runs a peer's script from `bench/` with `python` and parses the JSON
/// object it prints last.
fn run_peer<T: serde::de::DeserializeOwned>(
    python: &str,
    script: &str,
    needs: &str,
    configure: impl FnOnce(&mut Command),
) -> anyhow::Result<T> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("bench")
        .join(script);
    let mut cmd = Command::new(python);
    cmd.arg(&script);
    configure(&mut cmd);
    let out = cmd
        .output()
        .with_context(|| format!("running {python} {}", script.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "{} failed (needs {needs} in {python}): {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let text = String::from_utf8(out.stdout)?;
    Ok(serde_json::from_str(
        text.lines().last().unwrap_or_default(),
    )?)
}

fn run_torch(args: &ClassifyBenchArgs, cases: &[Case]) -> anyhow::Result<FrameworkResult> {
    let dir = std::env::temp_dir().join(format!("kefu-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cases_path = dir.join("cases.json");
    std::fs::write(&cases_path, serde_json::to_vec(cases)?)?;
    let result = run_peer(
        &args.torch_python,
        "classify_torch.py",
        "torch and transformers",
        |cmd| {
            cmd.arg("--model")
                .arg(&args.model)
                .arg("--cases")
                .arg(&cases_path)
                .args(["--threads", &args.threads.to_string()])
                .args(["--seconds", &args.seconds.to_string()])
                .env("OMP_NUM_THREADS", args.threads.to_string());
        },
    );
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Runs kefu's and PyTorch's classifier on the same texts and prints a table
/// with the ratio.
pub fn classify(args: &ClassifyBenchArgs) -> anyhow::Result<()> {
    let cases = cases(&args.batches);
    eprintln!(
        "bench: kefu on {} ({} threads, {} s per case)",
        args.model.display(),
        args.threads,
        args.seconds
    );
    let ours = run_kefu(args, &cases)?;
    let theirs = if args.torch_python.is_empty() {
        None
    } else {
        eprintln!("bench: PyTorch on the same texts");
        match run_torch(args, &cases) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("bench: {e:#}");
                None
            }
        }
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(
            out,
            "{}",
            serde_json::json!({"kefu": ours, "pytorch": theirs})
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "| case | batch | kefu msg/s | PyTorch msg/s | kefu / PyTorch |"
    )?;
    writeln!(out, "|---|---|---|---|---|")?;
    for (i, r) in ours.results.iter().enumerate() {
        let peer = theirs.as_ref().map(|t| t.results[i].messages_per_second);
        writeln!(
            out,
            "| {} | {} | {:.1} | {} | {} |",
            r.name,
            r.batch,
            r.messages_per_second,
            peer.map_or("-".into(), |p| format!("{p:.1}")),
            peer.map_or("-".into(), |p| format!("{:.2}x", r.messages_per_second / p)),
        )?;
    }
    writeln!(
        out,
        "| peak RSS (MB) | | {:.0} | {} | |",
        ours.peak_rss_mb,
        theirs
            .as_ref()
            .map_or("-".into(), |t| format!("{:.0}", t.peak_rss_mb))
    )?;
    if let Some(t) = &theirs {
        writeln!(out, "\n{} vs {}", ours.framework, t.framework)?;
    }
    Ok(())
}

#[derive(Debug, Clone, clap::Args)]
pub struct GenerateBenchArgs {
    /// GGUF files to measure; both default models when none is given.
    #[arg(long = "model")]
    pub models: Vec<PathBuf>,
    /// Threads for both mistral.rs (RAYON_NUM_THREADS) and llama.cpp.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Tokens to generate per reply.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: u32,
    /// Replies per model (the first one warms up and is not counted).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Python with llama-cpp-python; empty skips the llama.cpp side.
    #[arg(long, env = "KEFU_BENCH_PYTHON", default_value = "python3")]
    pub llama_python: String,
    /// Also start N replies at once and report kefu's aggregate decode
    /// tokens/s (mistral.rs batches them); 0 skips this.
    #[arg(long, default_value_t = 0)]
    pub concurrent: usize,
    /// Where mistral.rs runs (cuda needs a `make build-cuda` binary).
    #[arg(long, value_enum, default_value_t = Want::Auto)]
    pub device: Want,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One model's generation speed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GenerateResult {
    pub model: String,
    pub prompt_tokens: usize,
    pub prompt_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
    pub time_to_first_token_seconds: f64,
    /// Where it ran: `cuda:0` or `cpu` (mistral.rs' side only).
    #[serde(default)]
    pub device: String,
    /// Replies started at once for the aggregate figure (0: not measured).
    #[serde(default)]
    pub concurrent: usize,
    /// Generated tokens per second over all of them, from the first request
    /// to the last token.
    #[serde(default)]
    pub concurrent_tokens_per_second: f64,
}

const BENCH_SYSTEM: &str =
    "You are the customer-service assistant of an online shop. Answer politely \
     and briefly, never invent order facts, and ask for the order number when you need it.";
const BENCH_USER: &str =
    "Hello, I ordered a pair of running shoes last Tuesday and the tracking page \
     has not changed for three days. Can you tell me what is going on and when it will arrive?";

fn default_generators() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models");
    vec![
        root.join("qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct.gguf"),
        root.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    ]
}

async fn run_mistral(
    path: &std::path::Path,
    args: &GenerateBenchArgs,
) -> anyhow::Result<GenerateResult> {
    use crate::generate::mistral::{MistralGenerator, Options};
    use crate::generate::{Event, Generator, Message, Request, Role, Sampling};

    let generator = MistralGenerator::load(
        path,
        &Options {
            device: Policy {
                want: args.device,
                on_failure: OnGpuFailure::Refuse,
            },
            max_concurrent: args.concurrent.max(1),
            // Every run sends the same prompt: a prefix cache would skip prefill.
            prefix_cache: 0,
        },
    )
    .await?;
    let request = || Request {
        messages: vec![
            Message::new(Role::System, BENCH_SYSTEM),
            Message::new(Role::User, BENCH_USER),
        ],
        sampling: Sampling {
            temperature: 0.0,
            top_p: 1.0,
            max_new_tokens: args.max_new_tokens,
            stop: Vec::new(),
        },
        deadline: Instant::now() + Duration::from_secs(600),
    };
    let mut results = Vec::new();
    for run in 0..args.runs.max(2) {
        let started = Instant::now();
        let mut first = None;
        let mut stream = generator.stream(request()).await?;
        let usage = loop {
            match stream.recv().await {
                Some(Ok(Event::Delta(_))) => {
                    first.get_or_insert(started.elapsed().as_secs_f64());
                }
                Some(Ok(Event::Done(u))) => break u,
                Some(Err(e)) => return Err(e.into()),
                None => anyhow::bail!("the reply stream ended early"),
            }
        };
        if run > 0 {
            results.push(GenerateResult {
                model: path
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                prompt_tokens: usage.prompt_tokens,
                prompt_tokens_per_second: usage.prompt_tokens_per_second,
                decode_tokens_per_second: usage.completion_tokens_per_second,
                time_to_first_token_seconds: first.unwrap_or(0.0),
                ..GenerateResult::default()
            });
        }
    }
    let mut result = mean(&results);
    result.device = generator.device();
    if args.concurrent > 0 {
        // All at once, so mistral.rs schedules them as one batch.
        let started = Instant::now();
        let mut streams = Vec::with_capacity(args.concurrent);
        for _ in 0..args.concurrent {
            streams.push(generator.stream(request()).await?);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for mut stream in streams {
            tasks.spawn(async move {
                loop {
                    match stream.recv().await {
                        Some(Ok(Event::Delta(_))) => {}
                        Some(Ok(Event::Done(u))) => return Ok(u.completion_tokens),
                        Some(Err(e)) => return Err(anyhow::Error::from(e)),
                        None => anyhow::bail!("a reply stream ended early"),
                    }
                }
            });
        }
        let mut tokens = 0;
        while let Some(done) = tasks.join_next().await {
            tokens += done??;
        }
        result.concurrent = args.concurrent;
        result.concurrent_tokens_per_second = tokens as f64 / started.elapsed().as_secs_f64();
    }
    Ok(result)
}

fn mean(results: &[GenerateResult]) -> GenerateResult {
    let n = results.len().max(1) as f64;
    let mut m = results.first().cloned().unwrap_or_default();
    m.prompt_tokens_per_second = results
        .iter()
        .map(|r| r.prompt_tokens_per_second)
        .sum::<f64>()
        / n;
    m.decode_tokens_per_second = results
        .iter()
        .map(|r| r.decode_tokens_per_second)
        .sum::<f64>()
        / n;
    m.time_to_first_token_seconds = results
        .iter()
        .map(|r| r.time_to_first_token_seconds)
        .sum::<f64>()
        / n;
    m
}

fn run_llama(path: &std::path::Path, args: &GenerateBenchArgs) -> anyhow::Result<GenerateResult> {
    run_peer(
        &args.llama_python,
        "generate_llama.py",
        "llama-cpp-python",
        |cmd| {
            cmd.arg("--model")
                .arg(path)
                .args(["--threads", &args.threads.to_string()])
                .args(["--max-new-tokens", &args.max_new_tokens.to_string()])
                .args(["--runs", &args.runs.max(2).to_string()])
                .args(["--system", BENCH_SYSTEM, "--user", BENCH_USER]);
        },
    )
}

/// mistral.rs (in kefu) and llama.cpp on the same GGUF files, prompt and
/// thread count.
pub async fn generate(args: &GenerateBenchArgs) -> anyhow::Result<()> {
    // mistral.rs and candle size their CPU thread pools from this variable.
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    let models = if args.models.is_empty() {
        default_generators()
    } else {
        args.models.clone()
    };
    let mut rows = Vec::new();
    for path in &models {
        eprintln!("bench: mistral.rs on {}", path.display());
        let ours = run_mistral(path, args).await?;
        let theirs = if args.llama_python.is_empty() {
            None
        } else {
            eprintln!("bench: llama.cpp on {}", path.display());
            let (a, p) = (args.clone(), path.clone());
            match tokio::task::spawn_blocking(move || run_llama(&p, &a)).await? {
                Ok(r) => Some(r),
                Err(e) => {
                    eprintln!("bench: {e:#}");
                    None
                }
            }
        };
        rows.push((ours, theirs));
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let rows: Vec<_> = rows
            .iter()
            .map(|(o, t)| serde_json::json!({"mistralrs": o, "llama_cpp": t}))
            .collect();
        writeln!(out, "{}", serde_json::Value::Array(rows))?;
        return Ok(());
    }
    writeln!(
        out,
        "| model | metric | mistral.rs (kefu) | llama.cpp | kefu / llama.cpp |"
    )?;
    writeln!(out, "|---|---|---|---|---|")?;
    for (o, t) in &rows {
        let line = |out: &mut std::io::StdoutLock,
                    metric: &str,
                    ours: f64,
                    theirs: Option<f64>,
                    higher_better: bool| {
            let ratio = theirs.map(|t| if higher_better { ours / t } else { t / ours });
            writeln!(
                out,
                "| {} | {metric} | {ours:.2} | {} | {} |",
                o.model,
                theirs.map_or("-".into(), |t| format!("{t:.2}")),
                ratio.map_or("-".into(), |r| format!("{r:.2}x")),
            )
        };
        line(
            &mut out,
            "prompt tokens/s",
            o.prompt_tokens_per_second,
            t.as_ref().map(|t| t.prompt_tokens_per_second),
            true,
        )?;
        line(
            &mut out,
            "decode tokens/s",
            o.decode_tokens_per_second,
            t.as_ref().map(|t| t.decode_tokens_per_second),
            true,
        )?;
        line(
            &mut out,
            "time to first token (s)",
            o.time_to_first_token_seconds,
            t.as_ref().map(|t| t.time_to_first_token_seconds),
            false,
        )?;
        if o.concurrent > 0 {
            writeln!(
                out,
                "| {} | aggregate decode tokens/s, {} at once | {:.2} | - | - |",
                o.model, o.concurrent, o.concurrent_tokens_per_second
            )?;
        }
    }
    if let Some((o, _)) = rows.first() {
        writeln!(out, "\nmistral.rs on {}", o.device)?;
    }
    writeln!(
        out,
        "\n{} threads, {} new tokens, greedy, mean of {} runs after one warm-up",
        args.threads,
        args.max_new_tokens,
        args.runs.max(2) - 1
    )?;
    Ok(())
}
