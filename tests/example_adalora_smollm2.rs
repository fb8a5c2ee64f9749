//! Runs examples/adalora_smollm2/ (AdaLoRA against LoRA on the main example's task) in its
//! `--quick` configuration on SmolLM2-135M-Instruct. Skipped without the model unless
//! `LORA_REQUIRE_MODELS` is set (CI fetches it).

#[allow(dead_code)]
#[path = "../examples/adalora_smollm2/main.rs"]
mod adalora_smollm2;

use clap::Parser;

#[test]
fn adalora_example_runs_in_quick_mode() {
    if lora::models::cache::smollm2_or_skip("the adalora_smollm2 example")
        .unwrap()
        .is_none()
    {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let args = adalora_smollm2::Args::parse_from([
        "adalora_smollm2",
        "--quick",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    let (rows, pattern) = adalora_smollm2::run(args).unwrap();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert!(r.loss.is_finite() && r.trained > 0 && r.saved > 0, "{r:?}");
    }
    // AdaLoRA trains 12 singular values a module and keeps 8 on average: 480 of 720 on q, v.
    let ada = &rows[1];
    assert!(ada.saved < ada.trained, "{ada:?}");
    let pattern = pattern.expect("AdaLoRA's rank pattern");
    assert_eq!(pattern.len(), 60);
    let kept: usize = pattern.values().flatten().filter(|&&k| k).count();
    assert_eq!(kept, 480);
}
