//! Runs examples/finetune/ in its tiny `--quick` configuration so CI catches breakage: the
//! example itself checks that a reloaded adapter gives bit-identical outputs and that the merged
//! model matches; here we also check that both fine-tunings beat the base model.

#[allow(dead_code)]
#[path = "../examples/finetune/main.rs"]
mod finetune;

use clap::Parser;

#[test]
fn finetune_example_runs_in_quick_mode() {
    let out = tempfile::tempdir().unwrap();
    let args =
        finetune::Args::parse_from(["finetune", "--quick", "--out", out.path().to_str().unwrap()]);
    let s = finetune::run(args).unwrap();
    assert!(
        s.lora_loss < s.base_loss,
        "LoRA must improve on the base model: {} vs {}",
        s.lora_loss,
        s.base_loss
    );
    assert!(
        s.full_loss < s.base_loss,
        "full fine-tuning must improve on the base model"
    );
    assert!(
        s.adapter_bytes * 4 < s.full_bytes,
        "the adapter must be much smaller than the checkpoint"
    );
    assert!(out.path().join("adapter_config.json").exists());
}
