//! kefu's CPU kernels for BERT inference, as candle custom ops.
//!
//! Run op by op, candle spends most of a large batch outside the GEMMs: every
//! bias add, GELU and residual add allocates a new buffer and runs on one
//! thread while the other cores wait, and attention is one small
//! multi-threaded GEMM per (row, head), each paying rayon's start-up. These
//! ops fuse what belongs together and spread the work over candle's rayon
//! pool:
//!
//! - [`linear`]: `x · Wᵀ + b`, with the bias written into the output before
//!   the GEMM accumulates into it, then the activation in place;
//! - [`attention`]: scores, scale, padding mask, softmax and `P · V` for one
//!   (row, head) per task, reading Q, K and V straight out of the fused
//!   projection and writing the context in `[batch, seq, hidden]` order;
//! - [`add_layer_norm`]: the residual add and LayerNorm in one pass.
//!
//! They run for f32 on the CPU, forward only; training and other devices use
//! candle's ops (`BertForSequenceClassification::forward_graph`). A test
//! checks both paths give the same logits.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Whether the fused kernels can run for tensors of `dtype` on `device`.
pub fn supported(device: &Device, dtype: DType) -> bool {
    device.is_cpu() && dtype == DType::F32
}

/// The activation applied after a [`linear`] layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None,
    /// The exact GELU, `0.5·x·(1 + erf(x/√2))`.
    Gelu,
    /// The tanh approximation of GELU.
    GeluTanh,
    Relu,
}

fn parallelism() -> Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{what}: f32 expected, got {:?}", storage.dtype());
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: contiguous input expected"),
    }
}

/// Rows of `cols` values from the first `rows` of a contiguous slice.
fn rows_of(layout: &Layout) -> Result<(usize, usize)> {
    let dims = layout.dims();
    match dims.split_last() {
        Some((&cols, lead)) if cols > 0 => Ok((lead.iter().product(), cols)),
        _ => candle_core::bail!("expected a tensor with a non-empty last dimension"),
    }
}

struct LinearOp {
    act: Act,
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "kefu-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xs = f32_slice(x, xl, "linear input")?;
        let (rows, dim_in) = rows_of(xl)?;
        let CpuStorage::F32(w) = w else {
            candle_core::bail!("linear weight: f32 expected");
        };
        let (dim_out, w_in) = wl.shape().dims2()?;
        if w_in != dim_in {
            candle_core::bail!("linear: input has {dim_in} features, weight expects {w_in}");
        }
        let bias = f32_slice(b, bl, "linear bias")?;
        if bias.len() != dim_out {
            candle_core::bail!(
                "linear: bias has {} values for {dim_out} outputs",
                bias.len()
            );
        }
        // The output starts as the bias on every row; the GEMM adds x·Wᵀ.
        let mut out = Vec::with_capacity(rows * dim_out);
        for _ in 0..rows {
            out.extend_from_slice(bias);
        }
        let (w_row, w_col) = (wl.stride()[0] as isize, wl.stride()[1] as isize);
        // SAFETY: every pointer/stride pair stays inside its slice: x is
        // rows×dim_in row-major, W[o, i] is at start + o·w_row + i·w_col for
        // o < dim_out and i < dim_in (checked shapes), out is rows×dim_out.
        unsafe {
            gemm::gemm(
                rows,
                dim_out,
                dim_in,
                out.as_mut_ptr(),
                1,
                dim_out as isize,
                true,
                xs.as_ptr(),
                1,
                dim_in as isize,
                w.as_ptr().add(wl.start_offset()),
                // rhs[i, o] = W[o, i]
                w_row,
                w_col,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism(),
            );
        }
        if self.act != Act::None {
            let chunk = (out.len() / (4 * rayon::current_num_threads().max(1))).max(4096);
            let act = self.act;
            out.par_chunks_mut(chunk).for_each(|c| activate(c, act));
        }
        let mut shape = xl.dims().to_vec();
        *shape.last_mut().expect("rows_of checked the rank") = dim_out;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

fn activate(values: &mut [f32], act: Act) {
    match act {
        Act::None => {}
        Act::Gelu => {
            for v in values {
                *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
            }
        }
        Act::GeluTanh => {
            const C: f32 = 0.797_884_6; // sqrt(2/pi)
            for v in values {
                let x = *v;
                *v = 0.5 * x * (1.0 + (C * (x + 0.044_715 * x * x * x)).tanh());
            }
        }
        Act::Relu => {
            for v in values {
                *v = v.max(0.0);
            }
        }
    }
}

/// erf for f32 as a rational function on [-4, 4] (the approximation Eigen
/// uses for its vectorised `erf`; |error| < 2e-7), branch-free so the
/// compiler vectorises the loop around it. Beyond ±4 erf is ±1 in f32.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_600_1e-3;
    p = x2 * p + -1.609_603_3e-2;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329_2e-3;
    q = x2 * q + -1.426_474e-2;
    x * p / q
}

/// `x · Wᵀ + b` then `act`, over the last dimension of `x` (any leading
/// dimensions). `weight` is `[out, in]` as PyTorch stores it.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor, act: Act) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3_no_bwd(weight, bias, &LinearOp { act })
}

struct AttentionOp {
    heads: usize,
}

/// A raw pointer the attention tasks share; each writes a disjoint set of
/// output elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint (row, head) blocks; see `AttentionOp::cpu_fwd`.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl CustomOp2 for AttentionOp {
    fn name(&self) -> &'static str {
        "kefu-attention"
    }

    fn cpu_fwd(
        &self,
        qkv: &CpuStorage,
        ql: &Layout,
        mask: &CpuStorage,
        ml: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let qkv = f32_slice(qkv, ql, "attention qkv")?;
        let mask = f32_slice(mask, ml, "attention mask")?;
        let (batch, seq, three_h) = ql.shape().dims3()?;
        if three_h % 3 != 0 || (three_h / 3) % self.heads != 0 {
            candle_core::bail!("attention: {three_h} is not 3 × heads × head size");
        }
        if ml.shape().dims2()? != (batch, seq) {
            candle_core::bail!("attention: mask {:?} for qkv {:?}", ml.dims(), ql.dims());
        }
        let h = three_h / 3;
        let heads = self.heads;
        let d = h / heads;
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; batch * seq * h];
        let out_ptr = OutPtr(out.as_mut_ptr());
        (0..batch * heads).into_par_iter().for_each_init(
            || vec![0f32; seq * seq],
            |scores, task| {
                let (row, head) = (task / heads, task % heads);
                let base = row * seq * three_h + head * d;
                let (q, k, v) = (&qkv[base..], &qkv[base + h..], &qkv[base + 2 * h..]);
                // SAFETY: q/k/v index rows i < seq at i·three_h + j, j < d,
                // all inside this row's block of qkv; scores is seq×seq.
                unsafe {
                    gemm::gemm(
                        seq,
                        seq,
                        d,
                        scores.as_mut_ptr(),
                        1,
                        seq as isize,
                        false,
                        q.as_ptr(),
                        1,
                        three_h as isize,
                        // rhs[j, c] = K[c, j]
                        k.as_ptr(),
                        three_h as isize,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
                let bias = &mask[row * seq..(row + 1) * seq];
                for line in scores.chunks_exact_mut(seq) {
                    let mut max = f32::NEG_INFINITY;
                    for (s, b) in line.iter_mut().zip(bias) {
                        *s += b;
                        max = max.max(*s);
                    }
                    let mut sum = 0.0;
                    for s in line.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let inv = 1.0 / sum;
                    for s in line.iter_mut() {
                        *s *= inv;
                    }
                }
                let dst = out_ptr;
                // SAFETY: this task alone writes out[row, i, head·d + j] for
                // i < seq, j < d; V is read like Q and K above.
                unsafe {
                    gemm::gemm(
                        seq,
                        d,
                        seq,
                        dst.0.add(row * seq * h + head * d),
                        1,
                        h as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        seq as isize,
                        v.as_ptr(),
                        1,
                        three_h as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((batch, seq, h))))
    }
}

/// Multi-head self-attention from a fused projection: `qkv` is
/// `[batch, seq, 3·hidden]` (queries, keys, values side by side) and
/// `mask_bias` `[batch, seq]` is added to every query's scores (0 for tokens,
/// a large negative number for padding). Returns `[batch, seq, hidden]`.
pub fn attention(qkv: &Tensor, mask_bias: &Tensor, heads: usize) -> Result<Tensor> {
    qkv.contiguous()?
        .apply_op2_no_bwd(&mask_bias.contiguous()?, &AttentionOp { heads })
}

struct AddNormOp {
    eps: f32,
}

impl CustomOp3 for AddNormOp {
    fn name(&self) -> &'static str {
        "kefu-add-layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        r: &CpuStorage,
        rl: &Layout,
        p: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xs = f32_slice(x, xl, "layer norm input")?;
        let res = f32_slice(r, rl, "layer norm residual")?;
        let params = f32_slice(p, pl, "layer norm parameters")?;
        let (_, cols) = rows_of(xl)?;
        if xl.dims() != rl.dims() || params.len() != 2 * cols {
            candle_core::bail!(
                "add_layer_norm: shapes {:?} + {:?} with {} parameters",
                xl.dims(),
                rl.dims(),
                params.len()
            );
        }
        let (gamma, beta) = params.split_at(cols);
        let mut out = vec![0f32; xs.len()];
        let eps = self.eps;
        out.par_chunks_mut(cols)
            .zip(xs.par_chunks(cols).zip(res.par_chunks(cols)))
            .with_min_len(16)
            .for_each(|(o, (x, r))| {
                let mut sum = 0.0;
                for ((o, x), r) in o.iter_mut().zip(x).zip(r) {
                    *o = x + r;
                    sum += *o;
                }
                let mean = sum / cols as f32;
                let mut var = 0.0;
                for o in o.iter_mut() {
                    *o -= mean;
                    var += *o * *o;
                }
                let inv = 1.0 / (var / cols as f32 + eps).sqrt();
                for ((o, g), b) in o.iter_mut().zip(gamma).zip(beta) {
                    *o = *o * inv * g + b;
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// `LayerNorm(x + residual)` over the last dimension; `params` is `[2, hidden]`:
/// the weight, then the bias.
pub fn add_layer_norm(x: &Tensor, residual: &Tensor, params: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(
        &residual.contiguous()?,
        &params.contiguous()?,
        &AddNormOp { eps: eps as f32 },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_its_series() {
        let mut worst = 0f32;
        for i in -3000..=3000 {
            let x = i as f32 / 1000.0;
            worst = worst.max((erf(x) - series_erf(x)).abs());
        }
        assert!(worst < 1e-6, "largest error {worst}");
        for x in [4.0f32, 5.0, 30.0, f32::INFINITY] {
            assert!((erf(x) - 1.0).abs() < 1e-6 && (erf(-x) + 1.0).abs() < 1e-6);
        }
    }

    /// erf from its Taylor series in f64 (accurate to ~1e-13 for |x| <= 3).
    fn series_erf(x: f32) -> f32 {
        let x = x as f64;
        let (mut term, mut sum, mut n) = (x, x, 0.0);
        while term.abs() > 1e-17 {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        (sum * 2.0 / std::f64::consts::PI.sqrt()) as f32
    }

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn linear_matches_matmul_plus_bias_and_gelu() {
        let x = rand(&[3, 5, 8], 1);
        let w = rand(&[6, 8], 2);
        let b = rand(&[6], 3);
        let expected = x
            .broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let got = linear(&x, &w, &b, Act::None).unwrap();
        assert_eq!(got.dims(), &[3, 5, 6]);
        assert!(max_diff(&got, &expected) < 1e-5);
        let got = linear(&x, &w, &b, Act::Gelu).unwrap();
        assert!(max_diff(&got, &expected.gelu_erf().unwrap()) < 1e-5);
        let got = linear(&x, &w, &b, Act::Relu).unwrap();
        assert!(max_diff(&got, &expected.relu().unwrap()) < 1e-6);
    }

    #[test]
    fn attention_matches_the_op_by_op_version() {
        let (b, s, heads, d) = (2, 7, 2, 4);
        let h = heads * d;
        let qkv = rand(&[b, s, 3 * h], 4);
        // second row: last three positions are padding
        let mut m = vec![0f32; b * s];
        for v in &mut m[b * s - 3..] {
            *v = -1e9;
        }
        let mask = Tensor::from_vec(m, (b, s), &Device::Cpu).unwrap();
        let got = attention(&qkv, &mask, heads).unwrap();

        let split = |i: usize| {
            qkv.narrow(2, i * h, h)
                .unwrap()
                .reshape((b, s, heads, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (split(0), split(1), split(2));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let scores = scores
            .broadcast_add(&mask.reshape((b, 1, 1, s)).unwrap())
            .unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let expected = probs
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((b, s, h))
            .unwrap();
        assert!(max_diff(&got, &expected) < 1e-5);
    }

    #[test]
    fn add_layer_norm_matches_candle_nn() {
        let x = rand(&[4, 16], 5);
        let r = rand(&[4, 16], 6);
        let g = rand(&[16], 7);
        let bias = rand(&[16], 8);
        let params = Tensor::stack(&[&g, &bias], 0).unwrap();
        let got = add_layer_norm(&x, &r, &params, 1e-12).unwrap();
        let expected = candle_nn::ops::layer_norm(&(&x + &r).unwrap(), &g, &bias, 1e-12).unwrap();
        assert!(max_diff(&got, &expected) < 1e-5);
    }
}
