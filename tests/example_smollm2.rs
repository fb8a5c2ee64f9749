//! Runs examples/smollm2/ (the README's main example) in its `--quick` configuration: a few
//! steps of each configuration on SmolLM2-135M-Instruct. Skipped without the model unless
//! `LORA_REQUIRE_MODELS` is set (CI fetches it).

#[allow(dead_code)]
#[path = "../examples/smollm2/main.rs"]
mod smollm2;

use clap::Parser;

#[test]
fn smollm2_example_runs_in_quick_mode() {
    if lora::models::cache::smollm2_or_skip("the smollm2 example")
        .unwrap()
        .is_none()
    {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let args =
        smollm2::Args::parse_from(["smollm2", "--quick", "--out", out.path().to_str().unwrap()]);
    let rows = smollm2::run(args).unwrap();
    assert_eq!(rows.len(), 4);
    let base = &rows[0];
    for r in &rows[1..] {
        assert!(r.loss.is_finite() && r.trainable > 0, "{r:?}");
        // Even two steps move every configuration towards the task.
        assert!(
            r.loss < base.loss,
            "{} does not improve on the base: {r:?} vs {base:?}",
            r.name
        );
    }
    let (qv, all, full) = (&rows[1], &rows[2], &rows[3]);
    assert!(qv.trainable < all.trainable && all.trainable < full.trainable);
    assert!(
        qv.saved_bytes * 100 < full.saved_bytes,
        "adapter {} vs checkpoint {}",
        qv.saved_bytes,
        full.saved_bytes
    );
    assert!(out
        .path()
        .join("LoRA-r-8-q-v/adapter_config.json")
        .is_file());
    assert!(out.path().join("full-fine-tuning/config.json").is_file());
}
