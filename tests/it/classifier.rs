//! The candle BERT against transformers' own outputs, tokenization, and
//! batching.

use candle_core::Device;
use kefu::classify::checkpoint::Checkpoint;
use kefu::classify::worker::{classify_texts, logits, pad_id, probabilities};
use kefu::classify::{tokenizer, BatchLimits, LabelMap, ModelWorker, Task};

use crate::common::{expected, fixture};

fn assert_close(ours: &[Vec<f32>], theirs: &[Vec<f32>], tol: f32, what: &str) {
    assert_eq!(ours.len(), theirs.len());
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol, "{what}: row {i}: {a:?} vs {b:?}");
        }
    }
}

/// Each row's probabilities from a forward pass of its own.
fn each_alone(ckpt: &Checkpoint, rows: &[&[u32]]) -> Vec<Vec<f32>> {
    let pad = pad_id(&ckpt.tokenizer);
    rows.iter()
        .map(|r| {
            probabilities(&ckpt.model, &[r], pad, &Device::Cpu)
                .unwrap()
                .remove(0)
        })
        .collect()
}

fn check_checkpoint(dir: &str) {
    let exp = expected();
    let ckpt = Checkpoint::load(&fixture(dir), exp.max_len, &Device::Cpu).expect("fixture loads");
    assert_eq!(ckpt.labels, exp.labels);
    let ids: Vec<Vec<u32>> = exp
        .inputs
        .iter()
        .map(|t| tokenizer::encode(&ckpt.tokenizer, t).unwrap())
        .collect();
    for (i, (ours, theirs)) in ids.iter().zip(&exp.input_ids).enumerate() {
        assert_eq!(ours, theirs, "{dir}: token ids of {:?}", exp.inputs[i]);
    }
    let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let got = logits(&ckpt.model, &rows, pad_id(&ckpt.tokenizer), &Device::Cpu)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_close(&got, &exp.logits, 1e-4, dir);
}

#[test]
fn safetensors_and_vocab_txt_match_transformers() {
    check_checkpoint("tiny-bert");
}

#[test]
fn pytorch_bin_and_tokenizer_json_match_transformers() {
    check_checkpoint("tiny-bert-pt");
}

#[test]
fn tokenization_of_zh_en_and_mixed_text() {
    let ckpt = Checkpoint::load(&fixture("tiny-bert"), 64, &Device::Cpu).unwrap();
    let tok = &ckpt.tokenizer;
    let tokens =
        |text: &str| -> Vec<String> { tok.encode(text, true).unwrap().get_tokens().to_vec() };
    // Every CJK character is its own token.
    assert_eq!(tokens("转人工"), ["[CLS]", "转", "人", "工", "[SEP]"]);
    // Lower-cased, accents stripped, WordPiece continuation pieces.
    assert_eq!(
        tokens("iPhone Café"),
        ["[CLS]", "ip", "##hon", "##e", "cafe", "[SEP]"]
    );
    // Mixed text: English words and Han characters split apart.
    let mixed = tokens("这个size");
    assert_eq!(&mixed[..3], ["[CLS]", "这", "个"]);
    assert!(mixed[3..]
        .iter()
        .all(|t| !t.contains('这') && !t.contains('个')));
    // Truncation keeps [SEP] and respects max_len.
    let long = "发票".repeat(200);
    let ids = tokenizer::encode(tok, &long).unwrap();
    assert_eq!(ids.len(), 64);
    assert_eq!(ids.last(), tok.token_to_id("[SEP]").as_ref());
}

#[test]
fn a_batch_gives_the_same_probabilities_as_one_by_one() {
    let exp = expected();
    let ckpt = Checkpoint::load(&fixture("tiny-bert"), exp.max_len, &Device::Cpu).unwrap();
    let pad = pad_id(&ckpt.tokenizer);
    let ids: Vec<Vec<u32>> = exp
        .inputs
        .iter()
        .map(|t| tokenizer::encode(&ckpt.tokenizer, t).unwrap())
        .collect();
    let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let batched = probabilities(&ckpt.model, &rows, pad, &Device::Cpu).unwrap();
    let single = each_alone(&ckpt, &rows);
    assert_close(&batched, &single, 1e-5, "batched vs single");
    for p in &batched {
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
}

#[test]
fn fused_cpu_kernels_give_the_logits_of_candles_ops() {
    let exp = expected();
    let ckpt = Checkpoint::load(&fixture("tiny-bert"), exp.max_len, &Device::Cpu).unwrap();
    let pad = pad_id(&ckpt.tokenizer);
    // 48 rows of mixed lengths: padding in most rows, and more tokens than
    // one pass of the fused path takes, so the batch is cut into slices.
    let ids: Vec<Vec<u32>> = (0..48)
        .map(|i| {
            let text = exp.inputs[i % exp.inputs.len()].repeat(1 + i % 5);
            tokenizer::encode(&ckpt.tokenizer, &text).unwrap()
        })
        .collect();
    let (ids, masks) =
        kefu::classify::worker::pad(&ids.iter().map(Vec::as_slice).collect::<Vec<_>>(), pad);
    assert!(
        ids.len() * ids[0].len() > 1024,
        "the batch spans several passes"
    );
    let (ids, masks) = kefu::classify::bert::batch_tensors(&ids, &masks, &Device::Cpu).unwrap();
    let fused = ckpt.model.forward(&ids, &masks, false).unwrap();
    let graph = ckpt.model.forward_graph(&ids, &masks, false).unwrap();
    assert_close(
        &fused.to_vec2::<f32>().unwrap(),
        &graph.to_vec2::<f32>().unwrap(),
        1e-5,
        "fused vs candle ops",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_through_the_worker_get_the_reference_answers() {
    let exp = expected();
    let dir = fixture("tiny-bert");
    let ckpt = Checkpoint::load(&dir, exp.max_len, &Device::Cpu).unwrap();
    let map = LabelMap::new(Task::Sentiment, &ckpt.labels, &dir).unwrap();
    let reference = Checkpoint::load(&dir, exp.max_len, &Device::Cpu).unwrap();
    let worker = ModelWorker::spawn(
        ckpt,
        Device::Cpu,
        map.clone(),
        BatchLimits {
            max_batch: 4,
            max_batch_tokens: 128,
            queue: 64,
            ..BatchLimits::default()
        },
    );
    // Many concurrent callers: the worker batches them by count and tokens.
    let mut tasks = Vec::new();
    for text in exp.inputs.iter().cycle().take(48) {
        let worker = worker.clone();
        let text = text.clone();
        tasks.push(tokio::spawn(async move {
            (
                text.clone(),
                worker.classify_all(&[text]).await.unwrap().remove(0),
            )
        }));
    }
    for task in tasks {
        let (text, got) = task.await.unwrap();
        // Each window of the text on its own (the last fixture input is
        // longer than the model reads at once), then their mean.
        let rows = tokenizer::encode_windows(&reference.tokenizer, &text, 8).unwrap();
        let windows = each_alone(
            &reference,
            &rows.iter().map(Vec::as_slice).collect::<Vec<_>>(),
        );
        let want = map.scores(&kefu::classify::worker::mean(&windows));
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.label, w.label);
            assert!((g.probability - w.probability).abs() < 1e-5, "{text}");
        }
    }
}

#[tokio::test]
async fn a_full_queue_is_refused_not_waited_on() {
    let dir = fixture("tiny-bert");
    let ckpt = Checkpoint::load(&dir, 64, &Device::Cpu).unwrap();
    let map = LabelMap::new(Task::Sentiment, &ckpt.labels, &dir).unwrap();
    let worker = ModelWorker::spawn(
        ckpt,
        Device::Cpu,
        map,
        BatchLimits {
            max_batch: 1,
            max_batch_tokens: 64,
            queue: 2,
            ..BatchLimits::default()
        },
    );
    let texts: Vec<String> = (0..200).map(|i| format!("第{i}条消息")).collect();
    let err = worker.classify_all(&texts).await.unwrap_err();
    assert!(matches!(err, kefu::classify::Error::Overloaded(2)), "{err}");
}

/// A message longer than the model reads at once: the rows its windows
/// make, for a tokenizer.json and a vocab.txt checkpoint.
#[test]
fn a_long_text_is_read_in_even_windows_from_its_start_to_its_end() {
    let text: String = (0..60)
        .map(|i| ["发", "票", "退", "款", "好", "评", "差", "慢"][i % 8])
        .collect::<String>()
        + " the refund never came, 太失望了";
    for dir in ["tiny-bert", "tiny-bert-pt"] {
        let ckpt = Checkpoint::load(&fixture(dir), 16, &Device::Cpu).unwrap();
        let tok = &ckpt.tokenizer;
        let (cls, sep) = (tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]"));
        let whole = tokenizer::load(&fixture(dir), 10_000).unwrap();
        let full = tokenizer::encode(&whole, &text).unwrap();
        let content = &full[1..full.len() - 1];
        let rows = tokenizer::encode_windows(tok, &text, 8).unwrap();
        let starts = tokenizer::window_starts(content.len(), 14, 8);
        assert_eq!(rows.len(), content.len().div_ceil(14), "{dir}");
        assert_eq!(rows.len(), starts.len(), "{dir}");
        assert_eq!(rows[0], tokenizer::encode(tok, &text).unwrap(), "{dir}");
        for (row, start) in rows.iter().zip(starts) {
            assert_eq!(row.len(), 16, "{dir}");
            assert_eq!((row.first().copied(), row.last().copied()), (cls, sep));
            assert_eq!(&row[1..15], &content[start..start + 14], "{dir}");
        }
        // The last window ends with the text's last words.
        assert_eq!(rows.last().unwrap()[1..15], content[content.len() - 14..]);
        // A short text, or one window, is exactly what truncation gives.
        assert_eq!(
            tokenizer::encode_windows(tok, "转人工", 8).unwrap(),
            vec![tokenizer::encode(tok, "转人工").unwrap()]
        );
        assert_eq!(
            tokenizer::encode_windows(tok, &text, 1).unwrap(),
            vec![tokenizer::encode(tok, &text).unwrap()]
        );
        // At most `max_windows` rows, still from the first token to the last.
        let capped = tokenizer::encode_windows(tok, &text, 2).unwrap();
        assert_eq!(capped.len(), 2);
        assert_eq!(capped[0], rows[0]);
        assert_eq!(capped[1], *rows.last().unwrap());
    }
}

/// The worker and the command line give a long text the mean of its
/// windows' probabilities, each window classified on its own.
#[tokio::test]
async fn a_long_texts_probabilities_are_the_mean_of_its_windows() {
    let dir = fixture("tiny-bert");
    let text = "物流太慢了，等了整整两个星期才到。".repeat(6) + "不过客服态度很好，谢谢";
    let ckpt = Checkpoint::load(&dir, 16, &Device::Cpu).unwrap();
    let rows = tokenizer::encode_windows(&ckpt.tokenizer, &text, 8).unwrap();
    assert!(rows.len() > 2);
    let each = each_alone(&ckpt, &rows.iter().map(Vec::as_slice).collect::<Vec<_>>());
    let want: Vec<f32> = (0..each[0].len())
        .map(|j| each.iter().map(|p| p[j]).sum::<f32>() / each.len() as f32)
        .collect();
    let texts = [text.clone(), "好评".to_string()];
    let cli = classify_texts(&ckpt.model, &ckpt.tokenizer, &texts, 8, 4, &Device::Cpu).unwrap();
    assert_close(&cli[..1], std::slice::from_ref(&want), 1e-5, "command line");
    let map = LabelMap::new(Task::Sentiment, &ckpt.labels, &dir).unwrap();
    let worker = ModelWorker::spawn(ckpt, Device::Cpu, map.clone(), BatchLimits::default());
    let got = worker.classify_all(&texts).await.unwrap();
    for (g, w) in got[0].iter().zip(map.scores(&want)) {
        assert_eq!(g.label, w.label);
        assert!((g.probability - w.probability).abs() < 1e-5);
    }
    for (g, w) in got[1].iter().zip(map.scores(&cli[1])) {
        assert!((g.probability - w.probability).abs() < 1e-5);
    }
}
