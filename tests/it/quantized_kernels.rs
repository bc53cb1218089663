//! The quantised CPU matmul kefu's generator runs on (vendor/candle-core, see
//! its KEFU.md): the AVX2 dot products for Q4_1, Q5_0 and Q5_1, the
//! four-column kernels for Q4_1, Q5_0 and Q8_0, the banded matmul for several
//! rows and the one-row matmul, on the calling thread or the pool, must give
//! what candle's own scalar code gives.

use candle_core::quantized::k_quants::{self, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0};
use candle_core::quantized::GgmlType;

/// Deterministic values in [-1, 1) (xorshift), some blocks scaled up so the
/// blocks' scales differ as they do in real weights.
pub(crate) fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed | 1;
    (0..len)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let v = (state % 20_001) as f32 / 10_000.0 - 1.0;
            if (i / 32) % 3 == 0 {
                v * 4.0
            } else {
                v
            }
        })
        .collect()
}

fn quantize<T: GgmlType>(xs: &[f32]) -> Vec<T> {
    let mut blocks = vec![T::zeros(); xs.len() / T::BLCK_SIZE];
    T::from_float(xs, &mut blocks);
    blocks
}

/// `k_quants::matmul` (what `QMatMul` runs on the CPU) against candle's
/// scalar dot product on the same quantised inputs, for one row (decoding),
/// a few rows, and more rows than fit one band, with a column count that
/// leaves the last band short.
fn matches_scalar<T: GgmlType>() {
    // One row of 70 columns runs on the calling thread; one row of 2100
    // columns is enough work to go to the thread pool in chunks.
    let k = 256;
    for (m, n) in [(1usize, 70usize), (3, 70), (40, 70), (1, 2100)] {
        let weights: Vec<T> = quantize(&values(n * k, 7));
        let lhs = values(m * k, 11 + m as u64);
        let mut got = vec![0f32; m * n];
        k_quants::matmul((m, k, n), &lhs, &weights, &mut got).unwrap();

        let k_blocks = k / T::BLCK_SIZE;
        for row in 0..m {
            let lhs_row: Vec<T::VecDotType> = quantize(&lhs[row * k..(row + 1) * k]);
            for col in 0..n {
                let rhs = &weights[col * k_blocks..(col + 1) * k_blocks];
                let want = T::vec_dot_unopt(k, rhs, &lhs_row);
                let got = got[row * n + col];
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{:?} m={m} row {row} col {col}: {got} vs scalar {want}",
                    T::DTYPE
                );
            }
        }
    }
}

#[test]
fn q4_1_matmul_matches_candles_scalar_code() {
    matches_scalar::<BlockQ4_1>();
}

#[test]
fn q5_0_matmul_matches_candles_scalar_code() {
    matches_scalar::<BlockQ5_0>();
}

#[test]
fn q5_1_matmul_matches_candles_scalar_code() {
    matches_scalar::<BlockQ5_1>();
}

#[test]
fn q8_0_matmul_matches_candles_scalar_code_over_several_rows() {
    matches_scalar::<BlockQ8_0>();
}
