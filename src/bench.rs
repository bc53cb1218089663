//! `kefu bench`: speed and memory measured the same way for kefu and for the
//! peer it is compared with, in one run, so the ratio is not skewed by a
//! machine that got busier between two runs. Timing lives here, never in
//! tests.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::classify::checkpoint::Checkpoint;
use crate::classify::tokenizer;
use crate::classify::worker::{pad_id, probabilities};

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
fn cases() -> Vec<Case> {
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
    let short64 = make(&short, 64);
    let long64 = make(&[long_zh, long_en], 64);
    vec![
        Case {
            name: "short".into(),
            batch: 1,
            texts: short64.clone(),
        },
        Case {
            name: "short".into(),
            batch: 32,
            texts: short64,
        },
        Case {
            name: "long".into(),
            batch: 1,
            texts: long64.clone(),
        },
        Case {
            name: "long".into(),
            batch: 32,
            texts: long64,
        },
    ]
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
    let device = Device::Cpu;
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
        framework: format!("kefu {} (candle 0.10)", env!("CARGO_PKG_VERSION")),
        results,
        peak_rss_mb: peak_rss_mb(),
    })
}

fn run_torch(args: &ClassifyBenchArgs, cases: &[Case]) -> anyhow::Result<FrameworkResult> {
    let dir = std::env::temp_dir().join(format!("kefu-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cases_path = dir.join("cases.json");
    std::fs::write(&cases_path, serde_json::to_vec(cases)?)?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/classify_torch.py");
    let out = Command::new(&args.torch_python)
        .arg(&script)
        .arg("--model")
        .arg(&args.model)
        .arg("--cases")
        .arg(&cases_path)
        .args(["--threads", &args.threads.to_string()])
        .args(["--seconds", &args.seconds.to_string()])
        .env("OMP_NUM_THREADS", args.threads.to_string())
        .output()
        .with_context(|| format!("running {} {}", args.torch_python, script.display()))?;
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        anyhow::bail!(
            "the PyTorch side failed (needs torch and transformers in {}): {}",
            args.torch_python,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let last = String::from_utf8(out.stdout)?
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    Ok(serde_json::from_str(&last)?)
}

/// Runs kefu's and PyTorch's classifier on the same texts and prints a table
/// with the ratio.
pub fn classify(args: &ClassifyBenchArgs) -> anyhow::Result<()> {
    let cases = cases();
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
