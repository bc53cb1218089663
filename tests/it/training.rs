//! `kefu train` end to end on small samples of the committed data: the loss
//! falls, the checkpoint reloads with the same logits, fine-tuning keeps or
//! refreshes the head, and the CLI reports what it did.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use kefu::classify::bert::BertForSequenceClassification;
use kefu::classify::checkpoint::Checkpoint;
use kefu::classify::pretrain::{pretrain, PretrainOptions};
use kefu::classify::train::{train, FreshModel, Init, RunOptions, TrainOptions};
use kefu::classify::worker::{logits, pad_id};
use kefu::classify::{tokenizer, Task};
use tokenizers::Tokenizer;

use crate::common::{fixture, repo};

/// The first `n` lines of a committed data file, written to `dir`.
fn sample(src: &str, n: usize, dir: &Path, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(repo().join(src)).expect("committed data");
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(n)
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn options(task: Task, data: PathBuf, dev: PathBuf, out: PathBuf, init: Init) -> TrainOptions {
    TrainOptions {
        task,
        data,
        dev,
        out,
        init,
        run: run(),
        soft_weight: 0.5,
        windows: 1,
    }
}

fn run() -> RunOptions {
    RunOptions {
        epochs: 50,
        batch_size: 16,
        learning_rate: 2e-3,
        warmup_ratio: 0.1,
        weight_decay: 0.01,
        seed: 7,
        max_len: 48,
        max_steps: Some(40),
        half: false,
        average: None,
        progress: false,
    }
}

fn tiny() -> Init {
    Init::Fresh(FreshModel {
        vocab: None,
        hidden_size: 32,
        layers: 1,
        heads: 2,
        intermediate_size: 64,
        min_token_count: 2,
        add_words: None,
    })
}

/// A model's logits for four short customer messages, zh and en.
fn message_logits(model: &BertForSequenceClassification, tok: &Tokenizer) -> Tensor {
    let texts = [
        "我的快递到哪了",
        "I want a refund",
        "转人工!!",
        "优惠券怎么用",
    ];
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| tokenizer::encode(tok, t).unwrap())
        .collect();
    let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    logits(model, &rows, pad_id(tok), &Device::Cpu).unwrap()
}

/// The mean of the last four steps' losses is below `factor` times the
/// mean of the first four.
fn assert_loss_falls(losses: &[f32], factor: f32, what: &str) {
    let first: f32 = losses[..4].iter().sum::<f32>() / 4.0;
    let last: f32 = losses[losses.len() - 4..].iter().sum::<f32>() / 4.0;
    assert!(
        last < first * factor,
        "{what} did not fall: {first} -> {last}"
    );
}

#[test]
fn long_texts_train_as_windows() {
    let dir = tempfile::tempdir().unwrap();
    let data = sample("data/intents/train.jsonl", 120, dir.path(), "train.jsonl");
    let dev = sample("data/intents/test.jsonl", 30, dir.path(), "dev.jsonl");
    let out = dir.path().join("model");
    let mut opts = options(Task::Intent, data, dev, out.clone(), tiny());
    opts.run.epochs = 1;
    opts.run.max_steps = Some(8);
    opts.run.max_len = 12;
    opts.windows = 3;
    let trained = train(&opts).expect("training runs");
    let report = &trained.report;
    assert_eq!(report.train_examples, 120);
    // Messages longer than ten tokens give two or three rows each.
    assert!(
        report.train_rows > report.train_examples,
        "{} rows",
        report.train_rows
    );
    assert!(report.train_rows <= 3 * report.train_examples);
    assert!((0.0..=1.0).contains(&report.best_dev_accuracy));
    assert!(out.join("model.safetensors").exists());
}

#[test]
fn a_fresh_model_learns_and_its_checkpoint_reloads_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data = sample("data/intents/train.jsonl", 400, dir.path(), "train.jsonl");
    let dev = sample("data/intents/test.jsonl", 60, dir.path(), "dev.jsonl");
    let out = dir.path().join("model");
    let mut opts = options(Task::Intent, data, dev, out.clone(), tiny());
    // One epoch, cut short: what is saved is exactly the last step's model.
    opts.run.epochs = 1;
    opts.run.max_steps = Some(24);
    let trained = train(&opts).expect("training runs");
    let losses = &trained.report.step_losses;
    assert_eq!(losses.len(), 24);
    assert_loss_falls(losses, 0.9, "loss");

    for f in [
        "config.json",
        "model.safetensors",
        "vocab.txt",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing from the checkpoint");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["id2label"]["1"], "order_status");
    assert_eq!(config["label2id"]["human_agent"], 9);
    assert_eq!(config["architectures"][0], "BertForSequenceClassification");

    let reloaded = Checkpoint::load(&out, 48, &Device::Cpu).unwrap();
    let a = message_logits(&reloaded.model, &reloaded.tokenizer)
        .to_vec2::<f32>()
        .unwrap();
    let b = message_logits(&trained.last.model, &trained.tokenizer)
        .to_vec2::<f32>()
        .unwrap();
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        assert!(
            (x - y).abs() < 1e-5,
            "reloaded logits differ: {a:?} vs {b:?}"
        );
    }
}

#[test]
fn fine_tuning_keeps_a_matching_head_and_replaces_a_different_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = sample("data/sentiment/extra.jsonl", 64, dir.path(), "s.jsonl");
    let out = dir.path().join("sentiment");
    let mut opts = options(
        Task::Sentiment,
        data.clone(),
        data,
        out.clone(),
        Init::Pretrained(fixture("tiny-bert")),
    );
    opts.run.max_steps = Some(3);
    opts.run.max_len = 64;
    opts.run.half = true;
    let trained = train(&opts).unwrap();
    assert!(
        trained.report.fresh_head.is_empty(),
        "same labels: head kept"
    );
    // Saved in f16, it still loads as a checkpoint.
    Checkpoint::load(&out, 64, &Device::Cpu).unwrap();

    let data = sample("data/intents/train.jsonl", 64, dir.path(), "i.jsonl");
    let mut opts = options(
        Task::Intent,
        data.clone(),
        data,
        dir.path().join("intent"),
        Init::Pretrained(fixture("tiny-bert")),
    );
    opts.run.max_steps = Some(2);
    opts.run.max_len = 64;
    let trained = train(&opts).unwrap();
    assert_eq!(
        trained.report.fresh_head,
        ["classifier.bias", "classifier.weight"]
    );
}

#[test]
fn the_same_seed_trains_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = sample("data/intents/train.jsonl", 120, dir.path(), "train.jsonl");
    let dev = sample("data/intents/test.jsonl", 20, dir.path(), "dev.jsonl");
    let losses = |init: Init, seed: u64, out: &str| {
        let mut opts = options(
            Task::Intent,
            data.clone(),
            dev.clone(),
            dir.path().join(out),
            init,
        );
        opts.run.max_steps = Some(6);
        opts.run.seed = seed;
        train(&opts).expect("training runs").report.step_losses
    };
    // A fresh model: every weight, shuffle and dropout mask follows the seed.
    let first = losses(tiny(), 7, "a");
    assert_eq!(first, losses(tiny(), 7, "b"), "same seed, same steps");
    let weights =
        |out: &str| std::fs::read(dir.path().join(out).join("model.safetensors")).unwrap();
    assert!(weights("a") == weights("b"), "same seed, same checkpoint");
    assert_ne!(first, losses(tiny(), 8, "c"), "another seed, other steps");
    // Fine-tuning with a new head: the head is drawn from the seed too.
    let tuned = losses(Init::Pretrained(fixture("tiny-bert")), 7, "d");
    assert_eq!(
        tuned,
        losses(Init::Pretrained(fixture("tiny-bert")), 7, "e")
    );
}

#[test]
fn averaged_weights_are_what_is_saved_and_training_goes_on_undisturbed() {
    let dir = tempfile::tempdir().unwrap();
    let data = sample("data/intents/train.jsonl", 120, dir.path(), "train.jsonl");
    let dev = sample("data/intents/test.jsonl", 20, dir.path(), "dev.jsonl");
    // Eight steps an epoch: three dev evaluations swap the average in and out.
    let run = |average: Option<f64>, out: &str| {
        let mut opts = options(
            Task::Intent,
            data.clone(),
            dev.clone(),
            dir.path().join(out),
            tiny(),
        );
        opts.run.max_steps = Some(24);
        opts.run.average = average;
        train(&opts)
    };
    let weights =
        |out: &str| std::fs::read(dir.path().join(out).join("model.safetensors")).unwrap();
    let plain = run(None, "plain").expect("training runs");
    let averaged = run(Some(0.9), "averaged").expect("training runs");
    // The trained weights are put back after each evaluation exactly.
    assert_eq!(plain.report.step_losses, averaged.report.step_losses);
    assert!(
        weights("plain") != weights("averaged"),
        "the average is saved"
    );
    // A decay of 0 averages nothing: the saved model is the plain one.
    run(Some(0.0), "zero").expect("training runs");
    assert!(weights("plain") == weights("zero"));
    let err = run(Some(1.0), "one")
        .err()
        .expect("a decay of 1 is refused")
        .to_string();
    assert!(err.contains("--average"), "{err}");
}

#[test]
fn a_teachers_probabilities_steer_training_by_the_soft_weight() {
    let dir = tempfile::tempdir().unwrap();
    let data = sample("data/intents/train.jsonl", 120, dir.path(), "train.jsonl");
    let dev = sample("data/intents/test.jsonl", 20, dir.path(), "dev.jsonl");
    // A teacher that calls every message a greeting, whatever its label.
    let taught = dir.path().join("taught.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(&data)
        .unwrap()
        .lines()
        .map(|l| {
            let mut row: serde_json::Value = serde_json::from_str(l).unwrap();
            row["probabilities"] = serde_json::json!({"greeting": 0.9, "other": 0.1});
            row.to_string()
        })
        .collect();
    std::fs::write(&taught, lines.join("\n") + "\n").unwrap();
    let run = |data: &Path, soft_weight: f64, out: &str| {
        let mut opts = options(
            Task::Intent,
            data.to_path_buf(),
            dev.clone(),
            dir.path().join(out),
            tiny(),
        );
        opts.soft_weight = soft_weight;
        train(&opts).expect("training runs")
    };
    // A weight of 0 ignores the teacher: exactly the steps of the plain file.
    let plain = run(&data, 0.5, "plain").report.step_losses;
    assert_eq!(plain, run(&taught, 0.0, "ignored").report.step_losses);
    // A weight of 1 learns the teacher and not the labels.
    let trained = run(&taught, 1.0, "teacher");
    assert_ne!(plain, trained.report.step_losses);
    let pred = message_logits(&trained.last.model, &trained.tokenizer)
        .argmax(1)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    assert!(pred.iter().all(|&p| p == 0), "all greetings: {pred:?}");
}

#[test]
fn a_pretrained_masked_lm_learns_and_fine_tunes_into_a_classifier() {
    let dir = tempfile::tempdir().unwrap();
    let data = sample("data/intents/train.jsonl", 400, dir.path(), "train.jsonl");
    let dev = sample("data/sentiment/extra.jsonl", 40, dir.path(), "dev.jsonl");
    let out = dir.path().join("mlm");
    let Init::Fresh(shape) = tiny() else {
        unreachable!()
    };
    let report = pretrain(&PretrainOptions {
        data: vec![data.clone()],
        dev: vec![dev],
        out: out.clone(),
        shape,
        mask_prob: 0.15,
        run: RunOptions {
            epochs: 2,
            learning_rate: 5e-3,
            max_steps: Some(40),
            ..run()
        },
    })
    .expect("pretraining runs");
    let losses = &report.step_losses;
    assert_eq!(losses.len(), 40);
    assert_loss_falls(losses, 0.95, "masked-LM loss");
    assert!((0.0..=1.0).contains(&report.best_dev_accuracy));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "BertForMaskedLM");

    // `kefu train --init` starts from its encoder; the pooler and the
    // classifier start fresh, as transformers does.
    let mut opts = options(
        Task::Intent,
        data.clone(),
        data,
        dir.path().join("intent"),
        Init::Pretrained(out),
    );
    opts.run.max_steps = Some(2);
    let trained = train(&opts).unwrap();
    assert_eq!(
        trained.report.fresh_head,
        [
            "bert.pooler.dense.bias",
            "bert.pooler.dense.weight",
            "classifier.bias",
            "classifier.weight"
        ]
    );
}

#[test]
fn a_bad_training_line_is_reported_with_its_number() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bad.jsonl");
    std::fs::write(
        &data,
        "{\"text\": \"在吗\", \"label\": \"greeting\"}\n{\"text\": \"hi\"}\n",
    )
    .unwrap();
    let opts = options(
        Task::Intent,
        data.clone(),
        data,
        dir.path().join("m"),
        tiny(),
    );
    let err = train(&opts).err().expect("bad data is refused").to_string();
    assert!(err.contains("bad.jsonl:2:"), "{err}");
    assert!(
        !dir.path().join("m").exists(),
        "nothing written for bad input"
    );
}

fn kefu() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kefu"))
}

/// `kefu eval --json`'s one object for `model` on `data`.
fn eval_json(model: &Path, data: &Path) -> serde_json::Value {
    let out = kefu()
        .args(["eval", "--json", "--model"])
        .arg(model)
        .arg("--data")
        .arg(data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kefu eval --model {} --data {}: {}",
        model.display(),
        data.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_cli_classifies_and_evaluates() {
    let out = kefu()
        .args(["classify", "--model"])
        .arg(fixture("tiny-bert"))
        .args(["你好，在吗？", "Where is my parcel?"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["language"], "zh");
    assert_eq!(lines[1]["language"], "en");
    assert_eq!(lines[0]["probabilities"].as_array().unwrap().len(), 3);

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("eval.jsonl");
    std::fs::write(
        &data,
        "{\"text\": \"质量太差了\", \"label\": \"negative\"}\n{\"text\": \"在吗\", \"label\": \"neutral\"}\n",
    )
    .unwrap();
    let m = eval_json(&fixture("tiny-bert"), &data);
    assert_eq!(m["n"], 2);
    assert!(m["accuracy"].is_number() && m["macro_f1"].is_number());
    assert_eq!(m["confusion"].as_array().unwrap().len(), 3);
}

/// The committed default models against the committed held-out tests, by
/// the commands BENCHMARKS.md gives. Each floor sits three to five points
/// under the committed model's figure, beyond the 1-2.5 points by which
/// retraining with another seed moves them, so a retrained model that loses
/// ground fails here before it replaces the one users have.
#[test]
fn the_default_models_hold_their_figures_on_the_held_out_tests() {
    let floors = [
        ("models/sentiment", "data/sentiment/test.jsonl", 0.88),
        ("models/sentiment", "data/sentiment/intent-test.jsonl", 0.86),
        ("models/sentiment", "data/sentiment/test-hant.jsonl", 0.85),
        ("models/intent", "data/intents/test.jsonl", 0.90),
        ("models/intent", "data/intents/chat-test.jsonl", 0.80),
        ("models/intent", "data/intents/test-hant.jsonl", 0.90),
    ];
    for (model, data, floor) in floors {
        let m = eval_json(&repo().join(model), &repo().join(data));
        let accuracy = m["accuracy"].as_f64().unwrap();
        assert!(
            accuracy >= floor,
            "{model} on {data}: accuracy {accuracy:.3} under {floor}"
        );
    }
}

#[test]
fn every_command_has_help() {
    for cmd in [
        vec![],
        vec!["serve"],
        vec!["classify"],
        vec!["train"],
        vec!["pretrain"],
        vec!["eval"],
        vec!["generate"],
        vec!["chat"],
        vec!["export-corrections"],
        vec!["health"],
        vec!["bench", "classify"],
        vec!["bench", "generate"],
        vec!["bench", "chat"],
    ] {
        let out = kefu().args(&cmd).arg("--help").output().unwrap();
        assert!(out.status.success(), "kefu {cmd:?} --help failed");
        assert!(!out.stdout.is_empty());
    }
    let out = kefu().args(["train", "--task", "intent"]).output().unwrap();
    assert!(!out.status.success(), "missing arguments are refused");
}
