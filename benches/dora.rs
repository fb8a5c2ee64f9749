//! DoRA's forward overhead over plain LoRA: the Rust half of `scripts/bench_dora.py`, which runs
//! PyTorch + PEFT on the same shapes in the same run and prints both ratios.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench --bench dora      # one JSON line per shape
//! ```
//!
//! Cases (CPU, f32, r = 8, alpha = 16, non-zero `B`, inference): a 768 x 768 layer with bias on
//! 8 x 128 tokens and a 4096 x 4096 one on 1 x 256 tokens, as `forward/*` in `benches/lora.rs`:
//! the base `candle_nn::Linear`, the unmerged LoRA layer and the same factors as a DoRA adapter
//! (magnitudes 1.1 x the initial norms). Each case is timed in turn, `rounds` times, rotating
//! which goes first; the medians are printed.

use std::time::Instant;

use candle_core::{Device, Module, Tensor, Var};
use candle_nn::Linear;
use lora::prelude::*;
use lora::{Adapter, LoraLayer, DEFAULT_ADAPTER};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const RANK: usize = 8;
const ALPHA: f64 = 16.0;

fn randn(shape: &[usize], std: f32, rng: &mut StdRng) -> Tensor {
    let n: usize = shape.iter().product();
    let normal = rand_distr::Normal::new(0f32, std).unwrap();
    let v: Vec<f32> = (0..n).map(|_| rng.sample(normal)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The median nanoseconds of each case, run in turn `rounds` times after one warm-up round.
fn interleaved(rounds: usize, cases: &mut [(&str, &mut dyn FnMut())]) -> Vec<(String, u128)> {
    let mut times = vec![Vec::with_capacity(rounds); cases.len()];
    for round in 0..=rounds {
        for i in 0..cases.len() {
            let k = (i + round) % cases.len();
            let start = Instant::now();
            (cases[k].1)();
            if round > 0 {
                times[k].push(start.elapsed().as_nanos());
            }
        }
    }
    cases
        .iter()
        .zip(times)
        .map(|((name, _), mut t)| {
            t.sort_unstable();
            (name.to_string(), t[t.len() / 2])
        })
        .collect()
}

fn main() {
    for (name, d, tokens, rounds) in [("d768", 768, [8, 128], 40), ("d4096", 4096, [1, 256], 15)] {
        let mut rng = StdRng::seed_from_u64(1);
        let x = randn(&[tokens[0], tokens[1], d], 1.0, &mut rng);
        let w = randn(&[d, d], 0.02, &mut rng);
        let bias = randn(&[d], 0.02, &mut rng);
        let base = Linear::new(w.clone(), Some(bias.clone()));
        let mut lora = LoraLinear::from(base.clone());
        let config = LayerConfig::new(RANK, ALPHA).with_dora(true);
        let fresh = lora.fresh_adapter(&config, 7).unwrap();
        let b = Var::from_tensor(&randn(&[d, RANK], 0.02, &mut rng)).unwrap();
        let plain = Adapter::new(fresh.a().clone(), b, ALPHA, false, 0.0).unwrap();
        let m = fresh
            .magnitude()
            .unwrap()
            .as_tensor()
            .affine(1.1, 0.0)
            .unwrap();
        let dora_adapter = plain
            .clone()
            .with_magnitude(Var::from_tensor(&m).unwrap())
            .unwrap();
        lora.insert_adapter(DEFAULT_ADAPTER, plain).unwrap();
        let mut dora = LoraLinear::from(base.clone());
        dora.insert_adapter(DEFAULT_ADAPTER, dora_adapter).unwrap();
        let times = interleaved(
            rounds,
            &mut [
                ("base", &mut || drop(base.forward(&x).unwrap())),
                ("lora", &mut || drop(lora.forward(&x).unwrap())),
                ("dora", &mut || drop(dora.forward(&x).unwrap())),
            ],
        );
        let fields: Vec<String> = times
            .iter()
            .map(|(case, ns)| format!("\"{case}_ns\": {ns}"))
            .collect();
        println!("{{\"case\": \"{name}\", {}}}", fields.join(", "));
    }
}
