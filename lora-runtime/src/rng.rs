//! A seeded random generator whose whole state can be saved and restored: what makes a training
//! run reproducible bit for bit, across a checkpoint and a resume.
//!
//! candle's CPU backend cannot be seeded, and `candle_nn::ops::dropout` draws from it, so the
//! dropout masks of a training run come from here instead ([`DropoutRng`]); data shuffling uses
//! [`SeededRng`] directly. The generator is xoshiro256++ seeded through SplitMix64, as
//! `rand_xoshiro` does: fast, well-tested, and four `u64`s of state.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Tensor};

/// xoshiro256++: a small, fast generator with a 256-bit state that [`state`](Self::state) and
/// [`from_state`](Self::from_state) save and restore exactly.
///
/// ```
/// use lora_runtime::rng::SeededRng;
/// let mut a = SeededRng::new(7);
/// a.next_u64();
/// let mut b = SeededRng::from_state(a.state());
/// assert_eq!(a.next_u64(), b.next_u64());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeededRng {
    s: [u64; 4],
}

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SeededRng {
    /// A generator seeded with `seed` (the four state words drawn from SplitMix64).
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        Self {
            s: [
                splitmix64(&mut x),
                splitmix64(&mut x),
                splitmix64(&mut x),
                splitmix64(&mut x),
            ],
        }
    }

    /// A generator continuing from a saved [`state`](Self::state). An all-zero state (which
    /// xoshiro never reaches) is replaced by the state of seed 0.
    pub fn from_state(state: [u64; 4]) -> Self {
        if state == [0; 4] {
            return Self::new(0);
        }
        Self { s: state }
    }

    /// The whole state: restoring it with [`from_state`](Self::from_state) continues the same
    /// sequence.
    pub fn state(&self) -> [u64; 4] {
        self.s
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A uniform `f32` in `[0, 1)` (24 random bits).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// A uniform integer in `0..n` (`n > 0`; 0 for `n == 0`), without modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        // Lemire's method: reject the few values that would bias the product.
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Shuffles `items` in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// A [`SeededRng`] shared by every LoRA layer of a model for its dropout masks (see
/// [`LoraModelExt::set_dropout_rng`](crate::LoraModelExt::set_dropout_rng)). Clones share the
/// generator; layers draw from it in the order the forward pass reaches them, which is the same
/// in every run.
#[derive(Debug, Clone)]
pub struct DropoutRng(Arc<Mutex<SeededRng>>);

impl DropoutRng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(SeededRng::new(seed))))
    }

    fn with<T>(&self, f: impl FnOnce(&mut SeededRng) -> T) -> T {
        // The generator has no invariant a panic elsewhere could break.
        let mut rng = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut rng)
    }

    /// The generator's state (to save in a checkpoint).
    pub fn state(&self) -> [u64; 4] {
        self.with(|r| r.state())
    }

    /// Continues from a saved state.
    pub fn set_state(&self, state: [u64; 4]) {
        self.with(|r| *r = SeededRng::from_state(state));
    }

    /// Inverted dropout: each element of `x` zeroed with probability `p`, the others scaled by
    /// `1 / (1 - p)`, as `torch.nn.functional.dropout` in training mode. The mask is drawn here
    /// and multiplied in, so the gradient flows through the kept elements.
    ///
    /// # Errors
    /// A candle error from building the mask or the product; `p` outside `[0, 1)`.
    pub fn dropout(&self, x: &Tensor, p: f32) -> candle_core::Result<Tensor> {
        if !(0.0..1.0).contains(&p) {
            return Err(candle_core::Error::msg(format!(
                "dropout probability {p} is outside [0, 1)"
            )));
        }
        if p == 0.0 {
            return Ok(x.clone());
        }
        let scale = 1.0 / (1.0 - p);
        let n = x.elem_count();
        let mask: Vec<f32> = self.with(|r| {
            (0..n)
                .map(|_| if r.next_f32() < p { 0.0 } else { scale })
                .collect()
        });
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?;
        let mask = if x.dtype() == DType::F32 {
            mask
        } else {
            mask.to_dtype(x.dtype())?
        };
        x.mul(&mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn xoshiro_matches_the_reference_sequence() {
        // xoshiro256++ reference: state [1, 2, 3, 4] gives 41943041, 58720359, 3588806011781223.
        let mut r = SeededRng::from_state([1, 2, 3, 4]);
        assert_eq!(r.next_u64(), 41_943_041);
        assert_eq!(r.next_u64(), 58_720_359);
        assert_eq!(r.next_u64(), 3_588_806_011_781_223);
    }

    #[test]
    fn state_round_trips_and_shuffle_is_a_permutation() {
        let mut a = SeededRng::new(3);
        let mut v: Vec<u32> = (0..100).collect();
        a.shuffle(&mut v);
        let mut sorted = v.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(v, sorted);
        let mut b = SeededRng::from_state(a.state());
        assert_eq!(a.below(1000), b.below(1000));
    }

    #[test]
    fn dropout_keeps_the_expectation_and_replays_from_a_state() {
        let x = Tensor::ones((200, 50), DType::F32, &Device::Cpu).unwrap();
        let rng = DropoutRng::new(5);
        let state = rng.state();
        let y = rng.dropout(&x, 0.25).unwrap();
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let zeros = v.iter().filter(|&&e| e == 0.0).count() as f64 / v.len() as f64;
        assert!((zeros - 0.25).abs() < 0.02, "{zeros}");
        assert!(v.iter().all(|&e| e == 0.0 || (e - 4.0 / 3.0).abs() < 1e-6));
        rng.set_state(state);
        let again = rng.dropout(&x, 0.25).unwrap();
        let w: Vec<f32> = again.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, w);
        assert!(rng.dropout(&x, 1.0).is_err());
    }
}
