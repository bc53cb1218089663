//! `kefu pretrain`: masked-language-model pretraining of a fresh small BERT
//! on unlabelled text (reviews, chat logs), BERT's own recipe: 15% of the
//! tokens chosen, 80% of those replaced by `[MASK]`, 10% by a random token,
//! 10% left as they are, and the model asked for the original. The result is
//! a `BertForMaskedLM` checkpoint in the Hugging Face layout that
//! `kefu train --init DIR` fine-tunes into a classifier, so kefu's
//! classifiers can start from an encoder that has read the customers'
//! language instead of from random weights.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use tokenizers::Tokenizer;

use super::bert::{batch_tensors, BertConfig, BertForMaskedLM};
use super::checkpoint::{save_hf, seed_weights};
use super::rng::Rng;
use super::train::{
    fresh_tokenizer, tokenizer_set_max, write_atomically, FreshModel, RunOptions, Steps,
};
use super::worker::{pad, pad_id};
use super::{tokenizer, Error};

#[derive(Debug, Clone)]
pub struct PretrainOptions {
    /// Text files: JSONL with a `text` field (other fields ignored), or
    /// plain text with one text per line.
    pub data: Vec<PathBuf>,
    /// Held-out texts; the epoch with the best masked-token accuracy on them
    /// is kept.
    pub dev: Vec<PathBuf>,
    pub out: PathBuf,
    pub shape: FreshModel,
    /// Fraction of tokens the model must restore.
    pub mask_prob: f64,
    pub run: RunOptions,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PretrainReport {
    pub steps: usize,
    pub best_epoch: usize,
    /// Share of masked tokens restored exactly on the dev texts.
    pub best_dev_accuracy: f64,
    pub epoch_losses: Vec<f64>,
    pub step_losses: Vec<f32>,
    pub train_texts: usize,
    pub dev_texts: usize,
}

/// Reads texts from `path`: a `.jsonl`/`.json` file's `text` fields (a bad
/// line is reported with its number), or every non-empty line of any other
/// file.
pub fn read_texts(path: &Path) -> Result<Vec<String>, Error> {
    let content = std::fs::read_to_string(path).map_err(|e| Error::load(path, e))?;
    let json = path
        .extension()
        .is_some_and(|e| e == "jsonl" || e == "json");
    let mut texts = Vec::new();
    for (i, line) in content.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if !json {
            texts.push(line.trim().to_string());
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::Invalid(format!("{}:{}: {e}", path.display(), i + 1)))?;
        match value.get("text").and_then(|t| t.as_str()) {
            Some(t) if !t.trim().is_empty() => texts.push(t.to_string()),
            _ => {
                return Err(Error::Invalid(format!(
                    "{}:{}: expected an object with a non-empty \"text\"",
                    path.display(),
                    i + 1
                )))
            }
        }
    }
    if texts.is_empty() {
        return Err(Error::load(path, "no texts in the file"));
    }
    Ok(texts)
}

/// The token ids masking needs to know.
#[derive(Debug, Clone, Copy)]
pub struct MaskTokens {
    pub mask: u32,
    /// Random replacements are drawn from `first_regular..vocab` (special
    /// and unused tokens come first in BERT vocabularies).
    pub first_regular: u32,
    pub vocab: u32,
}

/// A batch ready for the masked-LM head.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskedBatch {
    /// The rows with their chosen tokens replaced, not yet padded.
    pub ids: Vec<Vec<u32>>,
    /// Chosen positions as indices into the padded `[rows × longest]` batch.
    pub positions: Vec<u32>,
    /// The original token at each position.
    pub targets: Vec<u32>,
}

/// Chooses about `prob` of each row's tokens (never the first and last,
/// `[CLS]` and `[SEP]`; at least one per row that has any) and replaces
/// them BERT's way: 80% `[MASK]`, 10% a random token, 10% unchanged.
pub fn mask_rows(rows: &[&[u32]], prob: f64, tokens: MaskTokens, rng: &mut Rng) -> MaskedBatch {
    let longest = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut out = MaskedBatch {
        ids: Vec::with_capacity(rows.len()),
        positions: Vec::new(),
        targets: Vec::new(),
    };
    let span = tokens.vocab.saturating_sub(tokens.first_regular).max(1) as u64;
    for (r, row) in rows.iter().enumerate() {
        let mut ids = row.to_vec();
        let inner = 1..row.len().saturating_sub(1);
        let mut chosen: Vec<usize> = inner
            .clone()
            .filter(|_| (rng.next_f32() as f64) < prob)
            .collect();
        if chosen.is_empty() && !inner.is_empty() {
            chosen.push(inner.start + (rng.next_u64() % inner.len() as u64) as usize);
        }
        for p in chosen {
            out.positions.push((r * longest + p) as u32);
            out.targets.push(row[p]);
            let roll = rng.next_f32();
            if roll < 0.8 {
                ids[p] = tokens.mask;
            } else if roll < 0.9 {
                ids[p] = tokens.first_regular + (rng.next_u64() % span) as u32;
            }
        }
        out.ids.push(ids);
    }
    out
}

fn mask_tokens(tok: &Tokenizer) -> Result<MaskTokens, Error> {
    let id = |t: &str| {
        tok.token_to_id(t)
            .ok_or_else(|| Error::Invalid(format!("the vocabulary has no {t} token")))
    };
    let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .map(|t| id(t))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(MaskTokens {
        mask: id("[MASK]")?,
        first_regular: specials.iter().max().copied().unwrap_or(0) + 1,
        vocab: tok.get_vocab_size(true) as u32,
    })
}

struct Batch {
    ids: Tensor,
    mask: Tensor,
    positions: Tensor,
    targets: Tensor,
    n: usize,
}

fn tensors(masked: MaskedBatch, pad_id: u32, device: &Device) -> Result<Batch, Error> {
    let rows: Vec<&[u32]> = masked.ids.iter().map(Vec::as_slice).collect();
    let (ids, mask) = pad(&rows, pad_id);
    let (ids, mask) = batch_tensors(&ids, &mask, device)?;
    let n = masked.targets.len();
    Ok(Batch {
        ids,
        mask,
        positions: Tensor::new(masked.positions, device)?,
        targets: Tensor::new(masked.targets, device)?,
        n,
    })
}

/// Masked-token accuracy on `rows`, with the same masks every epoch.
fn dev_accuracy(
    model: &BertForMaskedLM,
    rows: &[Vec<u32>],
    opts: &PretrainOptions,
    tokens: MaskTokens,
    pad_id: u32,
    device: &Device,
) -> Result<f64, Error> {
    let mut rng = Rng::new(opts.run.seed ^ 0x5EED_DE7A);
    let (mut right, mut total) = (0usize, 0usize);
    for chunk in rows.chunks(64) {
        let slices: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
        let batch = tensors(
            mask_rows(&slices, opts.mask_prob, tokens, &mut rng),
            pad_id,
            device,
        )?;
        if batch.n == 0 {
            continue;
        }
        let pred = model
            .forward(&batch.ids, &batch.mask, &batch.positions, false)?
            .argmax(1)?
            .to_vec1::<u32>()?;
        let gold = batch.targets.to_vec1::<u32>()?;
        right += pred.iter().zip(&gold).filter(|(p, g)| p == g).count();
        total += gold.len();
    }
    Ok(right as f64 / total.max(1) as f64)
}

/// Pretrains as `opts` says and writes the best epoch's `BertForMaskedLM`
/// checkpoint to `opts.out`.
pub fn pretrain(opts: &PretrainOptions) -> Result<PretrainReport, Error> {
    if opts.run.batch_size == 0 || opts.run.epochs == 0 {
        return Err(Error::Invalid(
            "--batch-size and --epochs must be at least 1".into(),
        ));
    }
    if !(0.0 < opts.mask_prob && opts.mask_prob < 1.0) {
        return Err(Error::Invalid("--mask-prob must be between 0 and 1".into()));
    }
    let device = Device::Cpu;
    super::rng::seed_dropout(opts.run.seed);
    let read_all = |paths: &[PathBuf]| -> Result<Vec<String>, Error> {
        let mut all = Vec::new();
        for p in paths {
            all.extend(read_texts(p)?);
        }
        Ok(all)
    };
    let train_texts = read_all(&opts.data)?;
    let dev_texts = read_all(&opts.dev)?;

    let texts: Vec<&str> = train_texts.iter().map(String::as_str).collect();
    let scratch = std::env::temp_dir().join(format!("kefu-{}-vocab.txt", std::process::id()));
    let mut tok = fresh_tokenizer(&opts.shape, &texts, &scratch)?;
    let max_len = opts.run.max_len.max(8);
    tokenizer_set_max(&mut tok, max_len)?;
    let tokens = mask_tokens(&tok)?;
    let mut config = BertConfig::new_small(
        tok.get_vocab_size(true),
        opts.shape.hidden_size,
        opts.shape.layers,
        opts.shape.heads,
        opts.shape.intermediate_size,
        max_len,
        &[],
    );
    config.id2label.clear();
    config.label2id.clear();
    config.extra.insert(
        "architectures".into(),
        serde_json::json!(["BertForMaskedLM"]),
    );
    config.validate().map_err(Error::Invalid)?;
    let varmap = VarMap::new();
    let model = BertForMaskedLM::load(
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
        &config,
    )?;
    seed_weights(&varmap, config.initializer_range, opts.run.seed, |_| true)?;

    let encode = |texts: &[String]| -> Result<Vec<Vec<u32>>, Error> {
        texts
            .iter()
            .map(|t| tokenizer::encode(&tok, t))
            .filter(|r| r.as_ref().map_or(true, |ids| ids.len() > 2))
            .collect()
    };
    let train_ids = encode(&train_texts)?;
    let dev_ids = encode(&dev_texts)?;
    let pad_id = pad_id(&tok);

    let mut steps = Steps::new(&varmap, &opts.run, train_ids.len())?;
    let mut report = PretrainReport {
        steps: 0,
        best_epoch: 0,
        best_dev_accuracy: -1.0,
        epoch_losses: Vec::new(),
        step_losses: Vec::new(),
        train_texts: train_ids.len(),
        dev_texts: dev_ids.len(),
    };
    let lengths: Vec<usize> = train_ids.iter().map(Vec::len).collect();
    let mut rng = Rng::new(opts.run.seed);
    for epoch in 1..=opts.run.epochs {
        for batch in super::train::epoch_batches(&lengths, opts.run.batch_size, &mut rng) {
            if steps.done() {
                break;
            }
            let rows: Vec<&[u32]> = batch.iter().map(|&i| train_ids[i].as_slice()).collect();
            let masked = mask_rows(&rows, opts.mask_prob, tokens, &mut rng);
            let batch = tensors(masked, pad_id, &device)?;
            if batch.n == 0 {
                continue;
            }
            let logits = model.forward(&batch.ids, &batch.mask, &batch.positions, true)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &batch.targets)?;
            steps.take(&loss, epoch, "mlm loss")?;
        }
        let Some(mean) = steps.end_epoch() else {
            break;
        };
        let (acc, best) = steps.keep_if_better(
            report.best_dev_accuracy,
            || dev_accuracy(&model, &dev_ids, opts, tokens, pad_id, &device),
            || {
                write_atomically(&opts.out, |tmp| {
                    save_hf(tmp, &config, &varmap, &tok, opts.run.half)
                })
            },
        )?;
        report.epoch_losses.push(mean);
        steps.println(format!(
            "epoch {epoch}: mlm loss {mean:.4}, dev masked-token accuracy {acc:.4}{}",
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
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKENS: MaskTokens = MaskTokens {
        mask: 4,
        first_regular: 5,
        vocab: 50,
    };

    #[test]
    fn masking_follows_berts_recipe() {
        let row: Vec<u32> = std::iter::once(2)
            .chain((0..2000).map(|i| 5 + (i % 40)))
            .chain(std::iter::once(3))
            .collect();
        let short = [2u32, 7, 3];
        let rows = [row.as_slice(), &short];
        let m = mask_rows(&rows, 0.15, TOKENS, &mut Rng::new(1));
        assert_eq!(
            m,
            mask_rows(&rows, 0.15, TOKENS, &mut Rng::new(1)),
            "seeded"
        );
        let longest = row.len();
        // [CLS] and [SEP] are never chosen; the short row gets its one token.
        let column = |p: u32| p as usize % longest;
        assert!(m
            .positions
            .iter()
            .all(|&p| column(p) != 0 && column(p) != longest - 1));
        assert_eq!(*m.positions.last().unwrap() as usize, longest + 1);
        let first: Vec<usize> = m
            .positions
            .iter()
            .map(|&p| p as usize)
            .filter(|&p| p < longest)
            .collect();
        assert!((240..360).contains(&first.len()), "{} chosen", first.len());
        let masked = first
            .iter()
            .filter(|&&p| m.ids[0][p] == TOKENS.mask)
            .count();
        let share = masked as f64 / first.len() as f64;
        assert!((0.7..0.9).contains(&share), "{share} replaced by [MASK]");
        for (&p, &t) in m.positions.iter().zip(&m.targets) {
            let (r, c) = (p as usize / longest, p as usize % longest);
            assert_eq!(rows[r][c], t, "target is the original token");
        }
        // Tokens not chosen are left alone.
        for (c, (&a, &b)) in m.ids[0].iter().zip(&row).enumerate() {
            if !first.contains(&c) {
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn texts_come_from_jsonl_or_plain_lines() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("a.jsonl");
        std::fs::write(
            &jsonl,
            "{\"text\": \"在吗\", \"label\": \"neutral\"}\n\n{\"text\": \"hi\"}\n",
        )
        .unwrap();
        assert_eq!(read_texts(&jsonl).unwrap(), ["在吗", "hi"]);
        let txt = dir.path().join("b.txt");
        std::fs::write(&txt, "快递到了吗\n\n  好评 \n").unwrap();
        assert_eq!(read_texts(&txt).unwrap(), ["快递到了吗", "好评"]);
        std::fs::write(&jsonl, "{\"text\": \"ok\"}\n{\"label\": \"x\"}\n").unwrap();
        let err = read_texts(&jsonl).unwrap_err().to_string();
        assert!(err.contains("a.jsonl:2"), "{err}");
    }
}
