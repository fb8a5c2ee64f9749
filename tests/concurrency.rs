//! Models are `Send + Sync`, and forwards on one model shared by many threads give exactly the
//! results of one thread, merged and unmerged. Mutation (`merge`, `unmerge`, `load_adapter`, ...)
//! takes `&mut self`, so the borrow checker rules out changing a model while threads read it
//! (see the `compile_fail` example on `LoraModel`).

mod common;

use candle_core::{Module, Tensor};
use candle_nn::{Linear, VarMap};
use common::{bits, tensor};
use lora::prelude::*;
use lora::{Adapter, LoadOptions, LoraConfig};

#[lora(rank = 4, alpha = 8, targets = ["up", "down"])]
struct Mlp {
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn new(seed: u64) -> Self {
        Self {
            up: Linear::new(
                tensor(seed, &[64, 32], 0.5),
                Some(tensor(seed + 1, &[64], 0.5)),
            )
            .into(),
            down: Linear::new(tensor(seed + 2, &[32, 64], 0.5), None).into(),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.down
            .forward(&self.up.forward(x).unwrap().relu().unwrap())
            .unwrap()
    }
}

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn models_and_their_parts_are_send_and_sync() {
    assert_send_sync::<Mlp>();
    assert_send_sync::<LoraLinear>();
    assert_send_sync::<Adapter>();
    assert_send_sync::<LoraConfig>();
    assert_send_sync::<LoadOptions>();
    assert_send_sync::<lora::Error>();
    assert_send_sync::<Vec<Mlp>>();
}

const THREADS: usize = 8;
const ROUNDS: usize = 4;

/// Runs every input through `model` on `THREADS` threads at once, `ROUNDS` times each, and
/// checks every result against the single-threaded one bit for bit.
fn check_shared_forwards(model: &Mlp, inputs: &[Tensor]) {
    let expected: Vec<Vec<u32>> = inputs.iter().map(|x| bits(&model.forward(x))).collect();
    let barrier = std::sync::Barrier::new(THREADS);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (barrier, expected) = (&barrier, &expected);
            s.spawn(move || {
                barrier.wait();
                for round in 0..ROUNDS {
                    // Each thread walks the inputs from a different start, so different inputs
                    // run at the same time.
                    for k in 0..inputs.len() {
                        let i = (k + t + round) % inputs.len();
                        assert_eq!(
                            bits(&model.forward(&inputs[i])),
                            expected[i],
                            "thread {t}, round {round}, input {i}"
                        );
                    }
                }
            });
        }
    });
}

#[test]
fn threads_sharing_a_model_get_the_single_threaded_results_merged_and_unmerged() {
    let mut model = Mlp::new(1);
    let varmap = VarMap::new();
    model.init_adapter(&varmap).unwrap();
    for (_, l, _) in model.lora_layers() {
        let b = l.adapter().unwrap().b();
        b.set(&tensor(9, b.dims(), 0.3)).unwrap();
    }
    let inputs: Vec<Tensor> = (0..6)
        .map(|i| tensor(100 + i, &[1 + i as usize, 5, 32], 1.0))
        .collect();
    check_shared_forwards(&model, &inputs);
    model.merge().unwrap();
    check_shared_forwards(&model, &inputs);
    model.unmerge().unwrap();
    check_shared_forwards(&model, &inputs);
}

#[test]
fn a_model_can_be_moved_to_another_thread_and_mutated_there() {
    let mut model = Mlp::new(2);
    model.init_adapter(&VarMap::new()).unwrap();
    let x = tensor(5, &[2, 32], 1.0);
    let before = bits(&model.forward(&x));
    let model = std::thread::spawn(move || {
        model.merge().unwrap();
        model.unmerge().unwrap();
        model
    })
    .join()
    .unwrap();
    assert_eq!(bits(&model.forward(&x)), before);
}
