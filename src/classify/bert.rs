//! `BertForSequenceClassification` in candle, laid out exactly as Hugging Face
//! transformers names its weights, so a checkpoint written by `save_pretrained`
//! loads as it is and gives the same logits: embeddings, encoder, pooler
//! (dense + tanh on `[CLS]`), then the classifier layer.
//!
//! The same code trains: every layer takes a `train` flag that turns dropout on
//! and swaps candle's fused (forward-only) kernels for differentiable ones.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

use super::cpu_ops::{self, Act};
use serde::{Deserialize, Serialize};

/// The subset of transformers' `BertConfig` kefu reads and writes. Unknown
/// fields are kept in `extra` so a config round-trips unchanged.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: usize,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classifier_dropout: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position_embedding_type: Option<String>,
    /// Label names by class index, as strings ("0", "1", ...), the way
    /// transformers writes them.
    #[serde(default)]
    pub id2label: BTreeMap<String, String>,
    #[serde(default)]
    pub label2id: BTreeMap<String, usize>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_positions() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_init_range() -> f64 {
    0.02
}

impl BertConfig {
    /// A config for a fresh model with the given shape and labels.
    pub fn new_small(
        vocab_size: usize,
        hidden_size: usize,
        layers: usize,
        heads: usize,
        intermediate_size: usize,
        max_positions: usize,
        labels: &[String],
    ) -> Self {
        let mut cfg = BertConfig {
            vocab_size,
            hidden_size,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size,
            hidden_act: default_act(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: max_positions,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            initializer_range: 0.02,
            classifier_dropout: None,
            position_embedding_type: Some("absolute".into()),
            id2label: BTreeMap::new(),
            label2id: BTreeMap::new(),
            extra: serde_json::Map::new(),
        };
        cfg.set_labels(labels);
        cfg.extra.insert("model_type".into(), "bert".into());
        cfg
    }

    /// Labels in class-index order; `None` when `id2label` is not a dense
    /// 0..n mapping.
    pub fn labels(&self) -> Option<Vec<String>> {
        let mut labels = vec![None; self.id2label.len()];
        for (id, label) in &self.id2label {
            let id: usize = id.parse().ok()?;
            *labels.get_mut(id)? = Some(label.clone());
        }
        labels.into_iter().collect()
    }

    /// Sets `id2label`/`label2id` and the architecture name transformers
    /// needs to rebuild the model.
    pub fn set_labels(&mut self, labels: &[String]) {
        self.id2label = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), l.clone()))
            .collect();
        self.label2id = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), i))
            .collect();
        self.extra.insert(
            "architectures".into(),
            serde_json::json!(["BertForSequenceClassification"]),
        );
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if let Some(kind) = &self.position_embedding_type {
            if kind != "absolute" {
                return Err(format!(
                    "position_embedding_type {kind:?} is not supported; kefu runs \"absolute\""
                ));
            }
        }
        Activation::parse(&self.hidden_act)?;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    /// transformers' "gelu": the exact, erf-based GELU.
    Gelu,
    /// transformers' "gelu_new"/"gelu_pytorch_tanh": the tanh approximation.
    GeluTanh,
    Relu,
}

impl Activation {
    fn parse(name: &str) -> std::result::Result<Self, String> {
        match name {
            "gelu" => Ok(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            "relu" => Ok(Self::Relu),
            other => Err(format!(
                "hidden_act {other:?} is not supported (gelu, gelu_new, relu)"
            )),
        }
    }

    fn forward(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
            Self::Relu => xs.relu(),
        }
    }

    fn fused(self) -> Act {
        match self {
            Self::Gelu => Act::Gelu,
            Self::GeluTanh => Act::GeluTanh,
            Self::Relu => Act::Relu,
        }
    }
}

fn normal(cfg: &BertConfig) -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: cfg.initializer_range,
    }
}

/// A dense layer; `weight` is `[out, in]` as in PyTorch.
#[derive(Debug, Clone)]
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    fn load(vb: VarBuilder, cfg: &BertConfig, dim_in: usize, dim_out: usize) -> Result<Self> {
        let weight = vb.get_with_hints((dim_out, dim_in), "weight", normal(cfg))?;
        let bias = vb.get_with_hints(dim_out, "bias", candle_nn::init::ZERO)?;
        Ok(Self { weight, bias })
    }

    /// One `[rows, in] x [in, out]` product over all leading dimensions:
    /// a single large GEMM instead of one small GEMM per batch row.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims();
        let (lead, dim_in) = dims.split_at(dims.len() - 1);
        let rows: usize = lead.iter().product();
        let ys = xs
            .reshape((rows, dim_in[0]))?
            .matmul(&self.weight.t()?)?
            .broadcast_add(&self.bias)?;
        let mut out = lead.to_vec();
        out.push(self.weight.dim(0)?);
        ys.reshape(out)
    }
}

#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        // Checkpoints converted from the original TensorFlow BERT call these
        // gamma/beta.
        let (w, b) = if vb.contains_tensor("weight") || !vb.contains_tensor("gamma") {
            ("weight", "bias")
        } else {
            ("gamma", "beta")
        };
        let weight = vb.get_with_hints(size, w, candle_nn::init::ONE)?;
        let bias = vb.get_with_hints(size, b, candle_nn::init::ZERO)?;
        Ok(Self { weight, bias, eps })
    }

    /// `[2, hidden]`: weight then bias, as `cpu_ops::add_layer_norm` takes them.
    fn params(&self) -> Result<Tensor> {
        Tensor::stack(&[&self.weight, &self.bias], 0)
    }

    fn forward(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if !train && xs.is_contiguous() {
            return candle_nn::ops::layer_norm(xs, &self.weight, &self.bias, self.eps as f32);
        }
        let hidden = xs.dim(D::Minus1)? as f64;
        let mean = (xs.sum_keepdim(D::Minus1)? / hidden)?;
        let centred = xs.broadcast_sub(&mean)?;
        let var = (centred.sqr()?.sum_keepdim(D::Minus1)? / hidden)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

fn dropout(xs: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if train && p > 0.0 {
        let mask = super::rng::dropout_mask(xs.elem_count(), p as f32);
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        xs * mask
    } else {
        Ok(xs.clone())
    }
}

#[derive(Debug, Clone)]
struct Embeddings {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    norm: LayerNorm,
    dropout: f64,
}

impl Embeddings {
    fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            word: vb.get_with_hints((cfg.vocab_size, h), "word_embeddings.weight", normal(cfg))?,
            position: vb.get_with_hints(
                (cfg.max_position_embeddings, h),
                "position_embeddings.weight",
                normal(cfg),
            )?,
            token_type: vb.get_with_hints(
                (cfg.type_vocab_size, h),
                "token_type_embeddings.weight",
                normal(cfg),
            )?,
            norm: LayerNorm::load(vb.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            dropout: cfg.hidden_dropout_prob,
        })
    }

    fn forward(&self, input_ids: &Tensor, train: bool) -> Result<Tensor> {
        let (batch, seq) = input_ids.dims2()?;
        let h = self.word.dim(1)?;
        let words = self
            .word
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((batch, seq, h))?;
        let positions = self.position.narrow(0, 0, seq)?.unsqueeze(0)?;
        // kefu classifies single texts: every token is segment 0.
        let token_type = self.token_type.narrow(0, 0, 1)?.unsqueeze(0)?;
        let xs = words
            .broadcast_add(&positions)?
            .broadcast_add(&token_type)?;
        let xs = self.norm.forward(&xs, train)?;
        dropout(&xs, self.dropout, train)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
    heads: usize,
    act: Activation,
    hidden_dropout: f64,
    attn_dropout: f64,
}

impl Layer {
    fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let attn = vb.pp("attention");
        let act = Activation::parse(&cfg.hidden_act).map_err(candle_core::Error::msg)?;
        Ok(Self {
            query: Linear::load(attn.pp("self").pp("query"), cfg, h, h)?,
            key: Linear::load(attn.pp("self").pp("key"), cfg, h, h)?,
            value: Linear::load(attn.pp("self").pp("value"), cfg, h, h)?,
            attn_out: Linear::load(attn.pp("output").pp("dense"), cfg, h, h)?,
            attn_norm: LayerNorm::load(attn.pp("output").pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            intermediate: Linear::load(
                vb.pp("intermediate").pp("dense"),
                cfg,
                h,
                cfg.intermediate_size,
            )?,
            output: Linear::load(vb.pp("output").pp("dense"), cfg, cfg.intermediate_size, h)?,
            out_norm: LayerNorm::load(vb.pp("output").pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            heads: cfg.num_attention_heads,
            act,
            hidden_dropout: cfg.hidden_dropout_prob,
            attn_dropout: cfg.attention_probs_dropout_prob,
        })
    }

    /// `mask_bias` is `[batch, 1, 1, seq]`: 0 for real tokens, a large
    /// negative number for padding.
    fn forward(&self, xs: &Tensor, mask_bias: &Tensor, train: bool) -> Result<Tensor> {
        let (b, s, h) = xs.dims3()?;
        let head_dim = h / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, s, self.heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.query.forward(xs)?)?;
        let k = split(self.key.forward(xs)?)?;
        let v = split(self.value.forward(xs)?)?;
        let scores = (q.matmul(&k.t()?)? / (head_dim as f64).sqrt())?;
        let scores = scores.broadcast_add(mask_bias)?;
        let probs = if train {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let probs = dropout(&probs, self.attn_dropout, train)?;
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, s, h))?;
        let attn = dropout(&self.attn_out.forward(&ctx)?, self.hidden_dropout, train)?;
        let xs = self.attn_norm.forward(&(attn + xs)?, train)?;
        let inner = self.act.forward(&self.intermediate.forward(&xs)?)?;
        let out = dropout(&self.output.forward(&inner)?, self.hidden_dropout, train)?;
        self.out_norm.forward(&(out + xs)?, train)
    }

    /// The weights the fused CPU kernels take: Q, K and V as one projection,
    /// each LayerNorm's weight and bias side by side.
    fn fuse(&self) -> Result<FusedLayer> {
        Ok(FusedLayer {
            qkv_weight: Tensor::cat(
                &[&self.query.weight, &self.key.weight, &self.value.weight],
                0,
            )?,
            qkv_bias: Tensor::cat(&[&self.query.bias, &self.key.bias, &self.value.bias], 0)?,
            attn_norm: self.attn_norm.params()?,
            out_norm: self.out_norm.params()?,
        })
    }

    /// Inference with kefu's fused CPU kernels (`cpu_ops`); the same result
    /// as `forward(.., train = false)`. `mask_bias` is `[batch, seq]`.
    fn forward_fused(&self, xs: &Tensor, mask_bias: &Tensor, fused: &FusedLayer) -> Result<Tensor> {
        let qkv = cpu_ops::linear(xs, &fused.qkv_weight, &fused.qkv_bias, Act::None)?;
        let ctx = cpu_ops::attention(&qkv, mask_bias, self.heads)?;
        let attn = cpu_ops::linear(&ctx, &self.attn_out.weight, &self.attn_out.bias, Act::None)?;
        let xs = cpu_ops::add_layer_norm(&attn, xs, &fused.attn_norm, self.attn_norm.eps)?;
        let inner = cpu_ops::linear(
            &xs,
            &self.intermediate.weight,
            &self.intermediate.bias,
            self.act.fused(),
        )?;
        let out = cpu_ops::linear(&inner, &self.output.weight, &self.output.bias, Act::None)?;
        cpu_ops::add_layer_norm(&out, &xs, &fused.out_norm, self.out_norm.eps)
    }
}

/// A layer's weights rearranged for the fused kernels. Built once for a
/// loaded checkpoint (`prepare_inference`); a model being trained builds them
/// per forward pass, because its weights change between steps.
#[derive(Debug, Clone)]
struct FusedLayer {
    qkv_weight: Tensor,
    qkv_bias: Tensor,
    attn_norm: Tensor,
    out_norm: Tensor,
}

/// Tokens per pass of the fused CPU path. With kefu's small models one
/// layer's widest activation (tokens × intermediate size) then fits in L2:
/// `kefu bench classify` measured long texts at batch 32 at 341 msg/s in one
/// pass, 461 in slices of 2048 tokens, 506 at 1024, 457 at 512.
const CPU_PASS_TOKENS: usize = 1024;

/// BERT encoder + pooler + classification head.
#[derive(Debug, Clone)]
pub struct BertForSequenceClassification {
    encoder: Encoder,
    /// Per layer, once `prepare_inference` ran.
    fused: Option<Vec<FusedLayer>>,
    pooler: Linear,
    classifier: Linear,
    classifier_dropout: f64,
    num_labels: usize,
}

impl BertForSequenceClassification {
    /// Builds the model from weights named as transformers names them
    /// (`bert.embeddings...`, `classifier.weight`). With a `VarBuilder` over a
    /// `VarMap`, missing weights are created with BERT's initialisation.
    pub fn load(vb: VarBuilder, cfg: &BertConfig, num_labels: usize) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let bert = vb.pp("bert");
        let encoder = Encoder::load(bert.clone(), cfg)?;
        let h = cfg.hidden_size;
        let pooler = Linear::load(bert.pp("pooler").pp("dense"), cfg, h, h)?;
        let classifier = Linear::load(vb.pp("classifier"), cfg, h, num_labels)?;
        Ok(Self {
            encoder,
            fused: None,
            pooler,
            classifier,
            classifier_dropout: cfg.classifier_dropout.unwrap_or(cfg.hidden_dropout_prob),
            num_labels,
        })
    }

    pub fn num_labels(&self) -> usize {
        self.num_labels
    }

    /// Readies a model that will only classify (a loaded checkpoint): the
    /// fused CPU kernels' weights are arranged once instead of per call.
    /// Do not call it on a model that is still being trained.
    pub fn prepare_inference(&mut self) -> Result<()> {
        let word = self.encoder.word_embeddings();
        if cpu_ops::supported(word.device(), word.dtype()) {
            let layers = &self.encoder.layers;
            self.fused = Some(layers.iter().map(Layer::fuse).collect::<Result<_>>()?);
        }
        Ok(())
    }

    /// Logits `[batch, num_labels]` for `input_ids` `[batch, seq]` (u32) and
    /// `attention_mask` `[batch, seq]` (1 for tokens, 0 for padding).
    /// Inference on the CPU runs kefu's fused kernels; training and other
    /// devices run candle's ops ([`Self::forward_graph`]).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let weights = self.encoder.word_embeddings();
        if train || !cpu_ops::supported(weights.device(), weights.dtype()) {
            return self.forward_graph(input_ids, attention_mask, train);
        }
        // A large batch goes through in slices of about CPU_PASS_TOKENS
        // tokens, so each layer's activations stay in the CPU's cache.
        let (b, s) = input_ids.dims2()?;
        let rows = (CPU_PASS_TOKENS / s.max(1)).max(1);
        if b <= rows {
            return self.forward_fused(input_ids, attention_mask);
        }
        let mut parts = Vec::with_capacity(b.div_ceil(rows));
        for start in (0..b).step_by(rows) {
            let n = rows.min(b - start);
            parts.push(self.forward_fused(
                &input_ids.narrow(0, start, n)?,
                &attention_mask.narrow(0, start, n)?,
            )?);
        }
        Tensor::cat(&parts, 0)
    }

    fn forward_fused(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let mask_bias = mask_bias(attention_mask)?;
        let mut xs = self.encoder.embeddings.forward(input_ids, false)?;
        for (i, layer) in self.encoder.layers.iter().enumerate() {
            xs = match &self.fused {
                Some(fused) => layer.forward_fused(&xs, &mask_bias, &fused[i])?,
                None => layer.forward_fused(&xs, &mask_bias, &layer.fuse()?)?,
            };
        }
        self.head(&xs, false)
    }

    /// The forward pass op by op in candle: differentiable, on any device.
    pub fn forward_graph(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let xs = self.encoder.forward(input_ids, attention_mask, train)?;
        self.head(&xs, train)
    }

    /// Pooler (dense + tanh on `[CLS]`) and classifier.
    fn head(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let cls = xs.narrow(1, 0, 1)?.squeeze(1)?;
        let pooled = self.pooler.forward(&cls)?.tanh()?;
        let pooled = dropout(&pooled, self.classifier_dropout, train)?;
        self.classifier.forward(&pooled)
    }
}

/// Embeddings and the transformer layers, under `bert.` in both heads'
/// checkpoints.
#[derive(Debug, Clone)]
struct Encoder {
    embeddings: Embeddings,
    layers: Vec<Layer>,
}

impl Encoder {
    fn load(bert: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let embeddings = Embeddings::load(bert.pp("embeddings"), cfg)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(bert.pp("encoder").pp("layer").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { embeddings, layers })
    }

    /// Op by op in candle: hidden states `[batch, seq, hidden]`.
    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, train: bool) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let mask_bias = mask_bias(attention_mask)?.reshape((b, 1, 1, s))?;
        let mut xs = self.embeddings.forward(input_ids, train)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &mask_bias, train)?;
        }
        Ok(xs)
    }

    fn word_embeddings(&self) -> &Tensor {
        &self.embeddings.word
    }
}

/// BERT with the masked-language-model head, as transformers'
/// `BertForMaskedLM` names it (`bert.*` without the pooler, then
/// `cls.predictions.transform.{dense,LayerNorm}` and `cls.predictions.bias`;
/// the decoder shares the word embeddings). `kefu pretrain` trains it on
/// unlabelled text so that a classifier starts from an encoder that has seen
/// the language (`kefu train --init`).
#[derive(Debug, Clone)]
pub struct BertForMaskedLM {
    encoder: Encoder,
    transform: Linear,
    transform_norm: LayerNorm,
    act: Activation,
    bias: Tensor,
}

impl BertForMaskedLM {
    pub fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let encoder = Encoder::load(vb.pp("bert"), cfg)?;
        let head = vb.pp("cls").pp("predictions");
        let h = cfg.hidden_size;
        Ok(Self {
            encoder,
            transform: Linear::load(head.pp("transform").pp("dense"), cfg, h, h)?,
            transform_norm: LayerNorm::load(
                head.pp("transform").pp("LayerNorm"),
                h,
                cfg.layer_norm_eps,
            )?,
            act: Activation::parse(&cfg.hidden_act).map_err(candle_core::Error::msg)?,
            bias: head.get_with_hints(cfg.vocab_size, "bias", candle_nn::init::ZERO)?,
        })
    }

    /// Vocabulary logits `[n, vocab]` at `positions` (indices into the
    /// flattened `[batch × seq]` tokens); only those rows go through the
    /// vocabulary projection.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        positions: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let xs = self.encoder.forward(input_ids, attention_mask, train)?;
        let h = xs.dim(2)?;
        let picked = xs.reshape(((), h))?.index_select(positions, 0)?;
        let t = self.act.forward(&self.transform.forward(&picked)?)?;
        let t = self.transform_norm.forward(&t, train)?;
        t.matmul(&self.encoder.word_embeddings().t()?)?
            .broadcast_add(&self.bias)
    }
}

/// `[batch, seq]`: 0 where the mask is 1, a large negative number where it
/// is 0. transformers adds the dtype's minimum to masked scores; any large
/// negative number gives the same probabilities after softmax.
fn mask_bias(attention_mask: &Tensor) -> Result<Tensor> {
    (attention_mask.to_dtype(DType::F32)? - 1.0)? * 1e9
}

/// Builds the `[batch, seq]` id and mask tensors for already-padded rows.
pub fn batch_tensors(
    ids: &[Vec<u32>],
    masks: &[Vec<u32>],
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let b = ids.len();
    let s = ids.first().map_or(0, Vec::len);
    let flat_ids: Vec<u32> = ids.iter().flatten().copied().collect();
    let flat_mask: Vec<u32> = masks.iter().flatten().copied().collect();
    Ok((
        Tensor::from_vec(flat_ids, (b, s), device)?,
        Tensor::from_vec(flat_mask, (b, s), device)?,
    ))
}
