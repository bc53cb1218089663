//! Hugging Face checkpoint directories in and out: `config.json`,
//! `model.safetensors` (or `pytorch_model.bin`), and the tokenizer files, as
//! `save_pretrained` writes them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use tokenizers::Tokenizer;

use super::bert::{BertConfig, BertForSequenceClassification};
use super::rng::Rng;
use super::{tokenizer, Error};

/// A loaded classifier checkpoint: model, tokenizer and labels.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: BertConfig,
    pub labels: Vec<String>,
    pub model: BertForSequenceClassification,
    pub tokenizer: Tokenizer,
}

pub fn read_config(dir: &Path) -> Result<BertConfig, Error> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::load(&path, e))?;
    let config: BertConfig = serde_json::from_str(&text).map_err(|e| Error::load(&path, e))?;
    config.validate().map_err(|e| Error::load(&path, e))?;
    Ok(config)
}

/// The weights file of a checkpoint: safetensors first, as transformers does.
pub fn weights_file(dir: &Path) -> Result<PathBuf, Error> {
    ["model.safetensors", "pytorch_model.bin"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.exists())
        .ok_or_else(|| Error::load(dir, "no model.safetensors or pytorch_model.bin"))
}

/// Reads every tensor of a weights file into memory (f32).
pub fn read_weights(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>, Error> {
    let tensors: Vec<(String, Tensor)> = if path.extension().is_some_and(|e| e == "safetensors") {
        candle_core::safetensors::load(path, device)
            .map_err(|e| Error::load(path, e))?
            .into_iter()
            .collect()
    } else {
        candle_core::pickle::read_all(path).map_err(|e| Error::load(path, e))?
    };
    tensors
        .into_iter()
        .map(|(name, t)| {
            let t = t.to_dtype(DType::F32)?.to_device(device)?;
            Ok((name, t))
        })
        .collect::<candle_core::Result<_>>()
        .map_err(|e| Error::load(path, e))
}

impl Checkpoint {
    /// Loads a checkpoint directory for inference on `device`.
    pub fn load(dir: &Path, max_len: usize, device: &Device) -> Result<Self, Error> {
        let config = read_config(dir)?;
        let labels = config.labels().filter(|l| !l.is_empty()).ok_or_else(|| {
            Error::load(
                &dir.join("config.json"),
                "id2label must map 0..n to label names",
            )
        })?;
        let weights = weights_file(dir)?;
        let tensors = read_weights(&weights, device)?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let model = BertForSequenceClassification::load(vb, &config, labels.len())
            .and_then(|mut m| m.prepare_inference().map(|()| m))
            .map_err(|e| Error::load(&weights, e))?;
        let max_len = max_len.min(config.max_position_embeddings);
        let tokenizer = tokenizer::load(dir, max_len)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            labels,
            model,
            tokenizer,
        })
    }
}

/// A trainable model: its variables live in a `VarMap` so the optimiser can
/// update them and `save` can write them.
pub struct Trainable {
    pub config: BertConfig,
    pub varmap: VarMap,
    pub model: BertForSequenceClassification,
}

/// Draws every weight that BERT initialises at random (dense layers and
/// embedding tables: `*.weight` outside LayerNorm) from N(0, `std`) with
/// kefu's own generator, so `--seed` fixes a fresh model exactly. candle
/// cannot seed its CPU generator, so without this two runs with the same seed
/// started from different weights and ended up different models. Each
/// weight's values depend only on the seed and its name, not on which other
/// weights the model has. Biases and LayerNorm keep their constant start.
/// Only the weights `pick` accepts are drawn.
pub(crate) fn seed_weights(
    varmap: &VarMap,
    std: f64,
    seed: u64,
    pick: impl Fn(&str) -> bool,
) -> Result<(), Error> {
    let vars = varmap.data().lock().expect("varmap lock poisoned").clone();
    for (name, var) in vars {
        if !name.ends_with(".weight") || name.contains("LayerNorm") || !pick(&name) {
            continue;
        }
        // FNV-1a of the name, mixed into the seed.
        let salt = name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01B3)
        });
        let mut rng = Rng::new(seed ^ salt);
        let values: Vec<f32> = (0..var.elem_count())
            .map(|_| rng.next_normal() * std as f32)
            .collect();
        let t = Tensor::from_vec(values, var.shape(), var.device()).map_err(Error::Candle)?;
        var.set(&t).map_err(Error::Candle)?;
    }
    Ok(())
}

impl Trainable {
    /// A fresh model with BERT's initialisation.
    pub fn fresh(config: BertConfig, device: &Device, seed: u64) -> Result<Self, Error> {
        let this = Self::unseeded(config, device)?;
        seed_weights(&this.varmap, this.config.initializer_range, seed, |_| true)?;
        Ok(this)
    }

    /// The model with candle's (unseedable) random start.
    fn unseeded(config: BertConfig, device: &Device) -> Result<Self, Error> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let labels = config.labels().unwrap_or_default().len();
        let model =
            BertForSequenceClassification::load(vb, &config, labels).map_err(Error::Candle)?;
        Ok(Self {
            config,
            varmap,
            model,
        })
    }

    /// Starts from an existing checkpoint (e.g. bert-base-chinese). The
    /// classifier head is kept when it has the right shape, otherwise it is
    /// initialised fresh; every other weight must be in the checkpoint.
    pub fn from_pretrained(
        dir: &Path,
        labels: &[String],
        device: &Device,
        seed: u64,
    ) -> Result<(Self, Vec<String>), Error> {
        let mut config = read_config(dir)?;
        let same_labels = config.labels().as_deref() == Some(labels);
        config.set_labels(labels);
        let this = Self::unseeded(config, device)?;
        let path = weights_file(dir)?;
        let tensors = read_weights(&path, device)?;
        let mut fresh = Vec::new();
        let vars = this
            .varmap
            .data()
            .lock()
            .expect("varmap lock poisoned")
            .clone();
        for (name, var) in vars {
            match tensors.get(&name) {
                Some(t)
                    if t.shape() == var.shape()
                        && (same_labels || !name.starts_with("classifier.")) =>
                {
                    var.set(t).map_err(Error::Candle)?;
                }
                _ if name.starts_with("classifier.") => fresh.push(name),
                // A masked-LM checkpoint (`kefu pretrain`, or transformers'
                // BertForMaskedLM) has no pooler; transformers starts it
                // fresh too.
                None if name.starts_with("bert.pooler.") => fresh.push(name),
                Some(t) => {
                    return Err(Error::load(
                        &path,
                        format!(
                            "{name} has shape {:?}, the config says {:?}",
                            t.dims(),
                            var.dims()
                        ),
                    ))
                }
                None => return Err(Error::load(&path, format!("{name} is missing"))),
            }
        }
        fresh.sort();
        // Only what the checkpoint did not have is drawn from the seed.
        seed_weights(&this.varmap, this.config.initializer_range, seed, |n| {
            fresh.iter().any(|f| f == n)
        })?;
        Ok((this, fresh))
    }

    /// Writes the checkpoint in the Hugging Face layout into `dir`, which
    /// must not exist yet: `config.json`, `model.safetensors` (f32, or f16
    /// when `half` is set) and the tokenizer files.
    pub fn save(&self, dir: &Path, tokenizer: &Tokenizer, half: bool) -> Result<(), Error> {
        save_hf(dir, &self.config, &self.varmap, tokenizer, half)
    }
}

/// Writes `config`, every variable of `varmap` (as `model.safetensors`, f32
/// or f16) and the tokenizer files into `dir`.
pub fn save_hf(
    dir: &Path,
    config: &BertConfig,
    varmap: &VarMap,
    tokenizer: &Tokenizer,
    half: bool,
) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|e| Error::save(dir, e))?;
    let config = serde_json::to_string_pretty(config).expect("config serialises");
    std::fs::write(dir.join("config.json"), config).map_err(|e| Error::save(dir, e))?;
    let dtype = if half { DType::F16 } else { DType::F32 };
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("varmap lock poisoned")
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_dtype(dtype)?)))
        .collect::<candle_core::Result<_>>()
        .map_err(Error::Candle)?;
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))
        .map_err(|e| Error::save(dir, e))?;
    save_tokenizer(tokenizer, dir)
}

/// Writes `tokenizer.json` plus the `vocab.txt`, `tokenizer_config.json` and
/// `special_tokens_map.json` that BertTokenizer (the slow one) reads.
pub fn save_tokenizer(tokenizer: &Tokenizer, dir: &Path) -> Result<(), Error> {
    let mut plain = tokenizer.clone();
    plain.with_padding(None);
    plain
        .with_truncation(None)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    plain
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| Error::save(dir, e))?;
    let mut vocab: Vec<(String, u32)> = tokenizer.get_vocab(false).into_iter().collect();
    vocab.sort_by_key(|(_, id)| *id);
    let mut text = String::new();
    for (token, _) in vocab {
        text.push_str(&token);
        text.push('\n');
    }
    std::fs::write(dir.join("vocab.txt"), text).map_err(|e| Error::save(dir, e))?;
    let lower = lowercases(tokenizer);
    let config = serde_json::json!({
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": lower,
        "tokenize_chinese_chars": true,
        "strip_accents": null,
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
        "model_max_length": 512,
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config).expect("json"),
    )
    .map_err(|e| Error::save(dir, e))?;
    let special = serde_json::json!({
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
        "cls_token": "[CLS]", "mask_token": "[MASK]",
    });
    std::fs::write(
        dir.join("special_tokens_map.json"),
        serde_json::to_string_pretty(&special).expect("json"),
    )
    .map_err(|e| Error::save(dir, e))
}

fn lowercases(tokenizer: &Tokenizer) -> bool {
    tokenizer
        .get_normalizer()
        .and_then(|n| serde_json::to_value(n).ok())
        .and_then(|v| v.get("lowercase").and_then(|l| l.as_bool()))
        .unwrap_or(true)
}
