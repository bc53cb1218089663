//! SplitMix64: a small seedable generator, so shuffles and dropout masks are
//! the same on every machine and Rust release (candle cannot seed its CPU
//! generator).

use std::cell::RefCell;

#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Standard normal (Box-Muller).
    pub fn next_normal(&mut self) -> f32 {
        // 1 - u is in (0, 1], so the logarithm is finite.
        let u = 1.0 - (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let v = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

thread_local! {
    static DROPOUT: RefCell<Rng> = RefCell::new(Rng::new(0));
}

/// Seeds the dropout masks drawn on this thread (training runs on one).
pub fn seed_dropout(seed: u64) {
    DROPOUT.with(|r| *r.borrow_mut() = Rng::new(seed ^ 0xD1B5_4A32_D192_ED03));
}

/// A dropout mask of `n` values: 0 with probability `p`, else `1 / (1 - p)`.
pub fn dropout_mask(n: usize, p: f32) -> Vec<f32> {
    let keep = 1.0 / (1.0 - p);
    DROPOUT.with(|r| {
        let mut r = r.borrow_mut();
        (0..n)
            .map(|_| if r.next_f32() < p { 0.0 } else { keep })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_repeat_with_the_seed_and_drop_about_p() {
        seed_dropout(3);
        let a = dropout_mask(10_000, 0.1);
        seed_dropout(3);
        assert_eq!(a, dropout_mask(10_000, 0.1));
        let dropped = a.iter().filter(|v| **v == 0.0).count();
        assert!((800..1200).contains(&dropped), "{dropped}");
    }
}
