//! mistral.rs' CPU attention as kefu builds it (vendor/mistralrs-core, see its
//! KEFU.md) must give what plain `softmax(q k^T * scale + mask) v` gives:
//! decoding one token against a KV cache short enough for the calling thread
//! and long enough for several pool tasks, grouped-query heads, a batch of two
//! with one sequence left-padded, and prompts under a causal mask, with the
//! cache a view into a larger buffer as mistral.rs' KV cache is.

use candle_core::{Device, Tensor};
use mistralrs_core::layers::{Sdpa, SdpaParams};

use crate::quantized_kernels::values;

/// SmolLM2's attention: 9 query heads sharing 3 KV heads, 64 wide.
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;

fn tensor(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
    let (a, b, c, d) = shape;
    Tensor::from_vec(values(a * b * c * d, seed), shape, &Device::Cpu).unwrap()
}

/// The first `len` positions of a cache with room for more, as mistral.rs'
/// KV cache hands them to attention (not contiguous).
fn cache_view(batch: usize, len: usize, seed: u64) -> Tensor {
    tensor((batch, KV_HEADS, len + 13, HEAD_DIM), seed)
        .narrow(2, 0, len)
        .unwrap()
}

fn params() -> SdpaParams {
    SdpaParams {
        n_kv_groups: HEADS / KV_HEADS,
        softcap: None,
        softmax_scale: 1.0 / (HEAD_DIM as f32).sqrt(),
        sliding_window: None,
        sinks: None,
    }
}

/// `softmax(q k^T * scale + mask) v` with candle's matmul and softmax, each KV
/// head repeated for the query heads that share it.
fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Tensor {
    let repeat = |t: &Tensor| {
        let (b, kv_heads, len, d) = t.dims4().unwrap();
        t.unsqueeze(2)
            .unwrap()
            .expand((b, kv_heads, HEADS / kv_heads, len, d))
            .unwrap()
            .reshape((b, HEADS, len, d))
            .unwrap()
    };
    let (k, v) = (repeat(k), repeat(v));
    let kt = k.t().unwrap().contiguous().unwrap();
    let scores =
        (q.contiguous().unwrap().matmul(&kt).unwrap() * params().softmax_scale as f64).unwrap();
    let scores = match mask {
        Some(mask) => scores.broadcast_add(mask).unwrap(),
        None => scores,
    };
    candle_nn::ops::softmax_last_dim(&scores)
        .unwrap()
        .matmul(&v)
        .unwrap()
}

fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * w.abs().max(1.0),
            "{what}: element {i} is {g}, softmax(q k^T) v gives {w}"
        );
    }
}

#[test]
fn decoding_one_token_matches_plain_attention() {
    // 256 positions run on the calling thread; 257 and 700 split into tasks.
    for (seed, kv_len) in [1, 7, 255, 256, 257, 700].into_iter().enumerate() {
        let seed = seed as u64 * 10;
        let q = tensor((1, HEADS, 1, HEAD_DIM), seed + 1);
        let k = cache_view(1, kv_len, seed + 2);
        let v = cache_view(1, kv_len, seed + 3);
        let got = Sdpa
            .run_attention(&q, &k, &v, None, None, &params())
            .unwrap();
        assert_close(
            &got,
            &reference(&q, &k, &v, None),
            &format!("decode, {kv_len} positions"),
        );
    }
}

#[test]
fn decoding_a_batch_keeps_each_sequence_apart() {
    // Two sequences at once, the second left-padded by 40 positions, over a
    // context long enough for several tasks.
    for kv_len in [120, 600] {
        let q = tensor((2, HEADS, 1, HEAD_DIM), 41);
        let k = cache_view(2, kv_len, 42);
        let v = cache_view(2, kv_len, 43);
        let mask: Vec<f32> = (0..2 * kv_len)
            .map(|i| {
                if i >= kv_len && i - kv_len < 40 {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (2, 1, 1, kv_len), &Device::Cpu).unwrap();
        let got = Sdpa
            .run_attention(&q, &k, &v, Some(&mask), None, &params())
            .unwrap();
        assert_close(
            &got,
            &reference(&q, &k, &v, Some(&mask)),
            &format!("batch of two, {kv_len} positions"),
        );
    }
}

#[test]
fn a_prompt_under_a_causal_mask_matches_plain_attention() {
    // A whole prompt (37 tokens), then 5 tokens after 40 cached ones; each with
    // the mask mistral.rs builds (query by key, -inf above the diagonal) and
    // the same mask as a 4-D (batch, head, query, key) tensor.
    for (past, len) in [(0, 37), (40, 5)] {
        let kv_len = past + len;
        let q = tensor((1, HEADS, len, HEAD_DIM), 51);
        let k = cache_view(1, kv_len, 52);
        let v = cache_view(1, kv_len, 53);
        let mask: Vec<f32> = (0..len * kv_len)
            .map(|i| {
                let (row, col) = (i / kv_len, i % kv_len);
                if col > past + row {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (len, kv_len), &Device::Cpu).unwrap();
        let masks = [mask.clone(), mask.reshape((1, 1, len, kv_len)).unwrap()];
        for mask in &masks {
            let got = Sdpa
                .run_attention(&q, &k, &v, Some(mask), None, &params())
                .unwrap();
            assert_close(
                &got,
                &reference(&q, &k, &v, Some(mask)),
                &format!("prompt of {len} after {past}, mask {:?}", mask.dims()),
            );
        }
    }
}
