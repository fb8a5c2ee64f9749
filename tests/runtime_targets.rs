//! Adapters whose layers are chosen at run time: `#[lora(adaptable = [..])]` fields, and
//! `InitOptions::with_peft_config` selecting layers and hyper-parameters as PEFT's
//! `get_peft_model` does.

mod common;

use candle_core::{Module, Tensor};
use candle_nn::{Linear, VarMap};
use common::{bits, tensor};
use lora::prelude::*;
use lora::Error;

#[lora(rank = 4, alpha = 8, targets = ["q_proj"], adaptable = ["k_proj", "v_proj", "o_proj"])]
struct Attn {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
}

#[lora(adaptable = ["gate_proj", "up_proj", "down_proj"])]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

#[lora]
struct Block {
    #[lora(nested)]
    self_attn: Attn,
    #[lora(nested)]
    mlp: Mlp,
}

#[lora(adaptable = ["lm_head"])]
struct Model {
    #[lora(nested)]
    layers: Vec<Block>,
    lm_head: Linear,
}

const D: usize = 8;

fn lin(seed: u64, out: usize, inp: usize) -> LoraLinear {
    LoraLinear::from(Linear::new(tensor(seed, &[out, inp], 0.5), None))
}

impl Model {
    fn new(seed: u64) -> Self {
        let block = |s: u64| Block {
            self_attn: Attn {
                q_proj: lin(s, D, D),
                k_proj: lin(s + 1, D / 2, D),
                v_proj: lin(s + 2, D / 2, D),
                o_proj: lin(s + 3, D, D),
            },
            mlp: Mlp {
                gate_proj: lin(s + 4, 2 * D, D),
                up_proj: lin(s + 5, 2 * D, D),
                down_proj: lin(s + 6, D, 2 * D),
            },
        };
        Model {
            layers: vec![block(seed), block(seed + 10)],
            lm_head: lin(seed + 20, 5, D),
        }
    }

    /// Every layer's output on its own input, so each adapter shows.
    fn outputs(&self, x: &Tensor) -> Vec<Vec<u32>> {
        let x2 = Tensor::cat(&[x, x], 1).unwrap();
        let mut out = Vec::new();
        for b in &self.layers {
            let a = &b.self_attn;
            for l in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj] {
                out.push(bits(&l.forward(x).unwrap()));
            }
            let m = &b.mlp;
            for l in [&m.gate_proj, &m.up_proj] {
                out.push(bits(&l.forward(x).unwrap()));
            }
            out.push(bits(&m.down_proj.forward(&x2).unwrap()));
        }
        out.push(bits(&self.lm_head.forward(x).unwrap()));
        out
    }
}

/// The paths with an adapter, and their ranks.
fn adapted(model: &Model) -> Vec<(String, usize)> {
    model
        .lora_layers()
        .into_iter()
        .filter_map(|(p, l, _)| l.adapter().map(|a| (p, a.rank())))
        .collect()
}

/// Gives every adapter a random non-zero `B`, so it changes outputs.
fn randomize(model: &Model) {
    for (i, (_, l, _)) in model.lora_layers().iter().enumerate() {
        if let Some(ad) = l.adapter() {
            ad.b()
                .set(&tensor(100 + i as u64, ad.b().dims(), 0.5))
                .unwrap();
        }
    }
}

fn peft(json: &str) -> LoraConfig {
    LoraConfig::from_json(json).unwrap()
}

#[test]
fn adaptable_layers_are_visited_without_a_default_config() {
    let model = Model::new(1);
    let layers = model.lora_layers();
    assert_eq!(layers.len(), 2 * 7 + 1);
    for (path, _, config) in &layers {
        assert_eq!(
            config.is_some(),
            path.ends_with("q_proj"),
            "{path}: {config:?}"
        );
    }
    assert_eq!(layers.last().unwrap().0, "lm_head");
}

#[test]
fn init_adapter_adapts_only_the_compile_time_targets() {
    let mut model = Model::new(1);
    let x = tensor(3, &[2, D], 1.0);
    let before = model.outputs(&x);
    model.init_adapter(&VarMap::new()).unwrap();
    assert_eq!(
        adapted(&model),
        [
            ("layers.0.self_attn.q_proj".to_string(), 4),
            ("layers.1.self_attn.q_proj".to_string(), 4)
        ]
    );
    randomize(&model);
    let after = model.outputs(&x);
    // Layers without an adapter are exactly their base; q_proj changed.
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        assert_eq!(b == a, i % 7 != 0 || i == 14, "output {i}");
    }
}

#[test]
fn a_model_without_default_adapter_points_to_the_run_time_way() {
    let mut mlp = Mlp {
        gate_proj: lin(1, 2 * D, D),
        up_proj: lin(2, 2 * D, D),
        down_proj: lin(3, D, 2 * D),
    };
    let varmap = VarMap::new();
    let err = mlp.init_adapter(&varmap).unwrap_err();
    assert!(matches!(err, Error::NoDefaultAdapter { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("with_peft_config") && msg.contains("gate_proj"),
        "{msg}"
    );
    assert!(varmap.all_vars().is_empty());
    assert!(mlp.adapters().is_empty());
}

#[test]
fn a_peft_config_selects_layers_and_hyper_parameters() {
    // A list with patterns: PEFT's rank_pattern / alpha_pattern by name and by full path.
    let mut model = Model::new(1);
    let config = peft(
        r#"{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"],
            "rank_pattern": {"v_proj": 2, "layers.1.self_attn.q_proj": 3},
            "alpha_pattern": {"down_proj": 4}, "use_rslora": true, "lora_dropout": 0.1,
            "init_lora_weights": "gaussian"}"#,
    );
    let varmap = VarMap::new();
    model
        .init_adapter_with(&varmap, &InitOptions::default().with_peft_config(config))
        .unwrap();
    let got = adapted(&model);
    let want = [
        ("layers.0.self_attn.q_proj", 8),
        ("layers.0.self_attn.v_proj", 2),
        ("layers.0.mlp.down_proj", 8),
        ("layers.1.self_attn.q_proj", 3),
        ("layers.1.self_attn.v_proj", 2),
        ("layers.1.mlp.down_proj", 8),
    ];
    assert_eq!(
        got,
        want.map(|(p, r)| (p.to_string(), r)).to_vec(),
        "adapted layers"
    );
    assert_eq!(varmap.all_vars().len(), 12);
    let down = model.layers[0].mlp.down_proj.adapter().unwrap();
    assert_eq!(down.alpha(), 4.0);
    assert!(down.use_rslora());
    assert_eq!(down.dropout(), 0.1);
    assert_eq!(down.scaling(), 4.0 / 8f64.sqrt());
    // Gaussian init: A ~ N(0, std = 1/r): at r = 2, values beyond kaiming's bound 1/sqrt(in).
    let a = model.layers[0].self_attn.v_proj.adapter().unwrap().a();
    let max = a
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(max > 1.0 / (D as f32).sqrt(), "{max}");
}

#[test]
fn all_linear_leaves_the_output_layer_out_and_exclude_modules_is_honoured() {
    let mut model = Model::new(1);
    let config = peft(r#"{"r": 2, "target_modules": "all-linear"}"#);
    model
        .init_adapter_with(
            &VarMap::new(),
            &InitOptions::default().with_peft_config(config),
        )
        .unwrap();
    let got = adapted(&model);
    assert_eq!(got.len(), 14);
    assert!(got.iter().all(|(p, _)| p != "lm_head"));

    let mut model = Model::new(1);
    let config = peft(
        r#"{"r": 2, "target_modules": "all-linear", "exclude_modules": ["o_proj", "layers.1.mlp.up_proj"]}"#,
    );
    model
        .init_adapter_with(
            &VarMap::new(),
            &InitOptions::default().with_peft_config(config),
        )
        .unwrap();
    let got: Vec<String> = adapted(&model).into_iter().map(|(p, _)| p).collect();
    assert_eq!(got.len(), 11, "{got:?}");
    assert!(!got
        .iter()
        .any(|p| p.ends_with("o_proj") || p == "layers.1.mlp.up_proj"));
}

#[test]
fn a_config_that_matches_nothing_is_an_error_and_changes_nothing() {
    let mut model = Model::new(1);
    let varmap = VarMap::new();
    for json in [
        r#"{"target_modules": ["qkv_proj"]}"#,
        r#"{"target_modules": "model\\.layers\\..*"}"#,
    ] {
        let err = model
            .init_adapter_with(
                &varmap,
                &InitOptions::default().with_peft_config(peft(json)),
            )
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig { field, .. } if field == "target_modules"),
            "{err:?}"
        );
        assert!(err.to_string().contains("matches none"), "{err}");
    }
    let err = model
        .init_adapter_with(
            &varmap,
            &InitOptions::default().with_peft_config(peft(
                r#"{"target_modules": ["q_proj"], "init_lora_weights": "loftq"}"#,
            )),
        )
        .unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported { field, .. } if field == "init_lora_weights"),
        "{err:?}"
    );
    assert!(varmap.all_vars().is_empty());
    assert!(adapted(&model).is_empty());
}

#[test]
fn the_saved_config_selects_exactly_the_adapted_layers() {
    let x = tensor(3, &[2, D], 1.0);
    for (targets, expect_full_paths) in [
        // Names that select exactly the adapted layers are kept short.
        (r#"["q_proj", "up_proj"]"#, false),
        // A regex that adapts only block 0: short names would select block 1 too.
        (r#""layers\\.0\\..*_proj""#, true),
    ] {
        let mut model = Model::new(1);
        let json = format!(r#"{{"r": 2, "lora_alpha": 4, "target_modules": {targets}}}"#);
        model
            .init_adapter_with(
                &VarMap::new(),
                &InitOptions::default().with_peft_config(peft(&json)),
            )
            .unwrap();
        randomize(&model);
        let dir = tempfile::tempdir().unwrap();
        model.save_adapter(dir.path()).unwrap();
        let saved = LoraConfig::from_file(dir.path().join("adapter_config.json")).unwrap();
        let LoraTargets::List(names) = &saved.targets else {
            panic!("{:?}", saved.targets)
        };
        assert_eq!(
            names.iter().any(|n| n.contains('.')),
            expect_full_paths,
            "{names:?}"
        );
        let adapted_paths: Vec<String> = adapted(&model).into_iter().map(|(p, _)| p).collect();
        for (p, _, _) in model.lora_layers() {
            assert_eq!(saved.targets_module(&p), adapted_paths.contains(&p), "{p}");
        }
        // A fresh model loads it back onto exactly those layers, with the same outputs.
        let mut fresh = Model::new(1);
        fresh.load_adapter(dir.path()).unwrap();
        assert_eq!(adapted(&fresh), adapted(&model));
        assert_eq!(fresh.outputs(&x), model.outputs(&x));
    }
}

use lora::TargetModules as LoraTargets;
