//! PiSSA and OLoRA against PEFT 0.21.2 (fixtures: `scripts/peft_decompose_fixtures.py`).

use std::path::PathBuf;

use lora::candle::{DType, Device, Tensor};
use lora::peft::{convert_to_lora, AdapterFile};

const CASES: [&str; 3] = ["pissa", "pissa_niter_2", "olora"];

fn case(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/peft/decompose")
        .join(name)
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

/// Our conversion of PEFT's trained and initial adapters is PEFT's converted adapter.
#[test]
fn conversion_to_plain_lora_equals_peft() {
    for name in CASES {
        let dir = case(name);
        let out = tempfile::tempdir().unwrap();
        convert_to_lora(dir.join("trained"), dir.join("initial"), out.path()).unwrap();
        let ours = AdapterFile::read(out.path()).unwrap();
        let peft = AdapterFile::read(dir.join("converted")).unwrap();
        assert_eq!(ours.config.rank, peft.config.rank, "{name}");
        assert_eq!(ours.config.alpha, peft.config.alpha, "{name}");
        assert_eq!(
            ours.factors.keys().collect::<Vec<_>>(),
            peft.factors.keys().collect::<Vec<_>>()
        );
        for (module, f) in &ours.factors {
            let p = &peft.factors[module];
            assert_eq!(max_diff(&f.a, &p.a), 0.0, "{name} {module} A");
            assert_eq!(max_diff(&f.b, &p.b), 0.0, "{name} {module} B");
        }
        let _ = (DType::F32, Device::Cpu);
    }
}
