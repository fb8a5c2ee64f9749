//! What `#[lora]` must accept, and what the generated `LoraModel` does with it.

use std::collections::BTreeSet;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{linear_no_bias, Linear, VarBuilder, VarMap};
use lora::prelude::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn vb(map: &VarMap) -> VarBuilder<'static> {
    VarBuilder::from_varmap(map, DType::F32, &Device::Cpu)
}

fn paths(model: &impl LoraModel) -> Vec<String> {
    model
        .lora_layers()
        .into_iter()
        .map(|(path, _, _)| path)
        .collect()
}

// --- three levels: Model -> Vec<Layer> -> Attention ----------------------------------------

/// Self-attention with adapters on the query and value projections.
#[lora(rank = 4, alpha = 8, targets = ["q_proj", "v_proj"])]
#[derive(Debug, Clone)]
pub struct Attention {
    /// The query projection.
    pub(crate) q_proj: Linear,
    pub(crate) k_proj: Linear,
    pub(crate) v_proj: candle_nn::Linear,
    pub(crate) o_proj: Linear,
}

impl Attention {
    fn new(d: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            q_proj: linear_no_bias(d, d, vb.pp("q_proj"))?.into(),
            k_proj: linear_no_bias(d, d, vb.pp("k_proj"))?,
            v_proj: linear_no_bias(d, d, vb.pp("v_proj"))?.into(),
            o_proj: linear_no_bias(d, d, vb.pp("o_proj"))?,
        })
    }
}

#[lora(rank = 2, alpha = 4.5, dropout = 0.1, rslora = true, init = "gaussian", targets = ["up"])]
pub struct Mlp {
    up: Linear,
    down: Linear,
}

#[lora]
pub struct Layer {
    #[lora(nested)]
    self_attn: Attention,
    #[lora(nested)]
    mlp: Mlp,
    norm_eps: f64,
}

#[lora]
pub struct Model {
    #[lora(nested)]
    layers: Vec<Layer>,
}

fn model(d: usize, n: usize, vb: VarBuilder) -> candle_core::Result<Model> {
    let layers = (0..n)
        .map(|i| {
            let vb = vb.pp("layers").pp(i);
            Ok(Layer {
                self_attn: Attention::new(d, vb.pp("self_attn"))?,
                mlp: Mlp {
                    up: linear_no_bias(d, 2 * d, vb.pp("mlp.up"))?.into(),
                    down: linear_no_bias(2 * d, d, vb.pp("mlp.down"))?,
                },
                norm_eps: 1e-6,
            })
        })
        .collect::<candle_core::Result<_>>()?;
    Ok(Model { layers })
}

#[test]
fn nested_paths_follow_field_order() -> TestResult {
    let base = VarMap::new();
    let model = model(8, 2, vb(&base))?;
    assert_eq!(
        paths(&model),
        [
            "layers.0.self_attn.q_proj",
            "layers.0.self_attn.v_proj",
            "layers.0.mlp.up",
            "layers.1.self_attn.q_proj",
            "layers.1.self_attn.v_proj",
            "layers.1.mlp.up",
        ]
    );
    assert_eq!(model.layers[0].norm_eps, 1e-6);
    assert_eq!(model.layers[0].mlp.down.weight().dims(), [8, 16]);
    Ok(())
}

#[test]
fn each_struct_has_its_own_config() -> TestResult {
    let base = VarMap::new();
    let model = model(8, 1, vb(&base))?;
    let configs: Vec<LayerConfig> = model
        .lora_layers()
        .into_iter()
        .map(|(_, _, c)| c.unwrap())
        .collect();
    assert_eq!(configs[0], LayerConfig::new(4, 8.0));
    assert_eq!(
        configs[2],
        LayerConfig::new(2, 4.5)
            .with_dropout(0.1)
            .with_rslora(true)
            .with_init(LoraInit::Gaussian)
    );
    Ok(())
}

#[test]
fn adapter_file_has_peft_keys() -> TestResult {
    let base = VarMap::new();
    let mut model = model(8, 2, vb(&base))?;
    let adapters = VarMap::new();
    model.init_adapter(&adapters)?;
    assert_eq!(model.trainable_vars().len(), 12);

    let dir = tempfile::tempdir()?;
    model.save_adapter(dir.path())?;
    let bytes = std::fs::read(dir.path().join("adapter_model.safetensors"))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)?;
    let keys: BTreeSet<String> = file.names().into_iter().map(str::to_owned).collect();
    let mut expected = BTreeSet::new();
    for i in 0..2 {
        for module in ["self_attn.q_proj", "self_attn.v_proj", "mlp.up"] {
            for factor in ["lora_A", "lora_B"] {
                expected.insert(format!(
                    "base_model.model.layers.{i}.{module}.{factor}.weight"
                ));
            }
        }
    }
    assert_eq!(keys, expected);
    Ok(())
}

#[test]
fn derives_doc_comments_and_visibility_are_kept() -> TestResult {
    let base = VarMap::new();
    let attn = Attention::new(4, vb(&base))?;
    let copy = attn.clone();
    assert!(format!("{copy:?}").contains("q_proj"));
    // Targets are `LoraLinear` now; the rest keep their type.
    let _: &LoraLinear = &copy.q_proj;
    let _: &Linear = &copy.k_proj;
    let _: &Linear = &copy.o_proj;
    let x = Tensor::ones((1, 4), DType::F32, &Device::Cpu)?;
    let y = attn.q_proj.forward(&x)?;
    assert_eq!(y.dims(), [1, 4]);
    Ok(())
}

// --- Option, Box and array fields, generics, aliases ----------------------------------------

use candle_nn::Linear as Dense;

#[lora(rank = 1, targets = ["proj"])]
struct Aliased {
    proj: Dense,
}

#[lora]
struct Wrappers {
    #[lora(nested)]
    maybe: Option<Aliased>,
    #[lora(nested)]
    boxed: Box<Aliased>,
    #[lora(nested)]
    pair: [Aliased; 2],
    #[lora(nested)]
    absent: Option<Aliased>,
}

fn aliased(vb: VarBuilder) -> candle_core::Result<Aliased> {
    Ok(Aliased {
        proj: linear_no_bias(2, 2, vb)?.into(),
    })
}

#[test]
fn option_box_and_array_fields() -> TestResult {
    let base = VarMap::new();
    let vb = vb(&base);
    let model = Wrappers {
        maybe: Some(aliased(vb.pp("maybe"))?),
        boxed: Box::new(aliased(vb.pp("boxed"))?),
        pair: [aliased(vb.pp("pair.0"))?, aliased(vb.pp("pair.1"))?],
        absent: None,
    };
    assert_eq!(
        paths(&model),
        ["maybe.proj", "boxed.proj", "pair.0.proj", "pair.1.proj"]
    );
    Ok(())
}

/// A generic container: the bound `Vec<L>: LoraModel` is added by the macro.
#[lora]
struct Stack<L, const N: usize> {
    #[lora(nested)]
    layers: Vec<L>,
    #[lora(nested)]
    heads: [L; N],
    name: &'static str,
}

#[test]
fn generic_struct() -> TestResult {
    let base = VarMap::new();
    let vb = vb(&base);
    let stack: Stack<Aliased, 1> = Stack {
        layers: vec![aliased(vb.pp("a"))?],
        heads: [aliased(vb.pp("b"))?],
        name: "stack",
    };
    assert_eq!(paths(&stack), ["layers.0.proj", "heads.0.proj"]);
    assert_eq!(stack.name, "stack");
    Ok(())
}

#[lora(crate = "lora", rank = 2, targets = ["r#type"])]
struct RawNames {
    r#type: Linear,
}

#[test]
fn crate_argument_and_raw_identifiers() -> TestResult {
    let base = VarMap::new();
    let model = RawNames {
        r#type: linear_no_bias(2, 2, vb(&base))?.into(),
    };
    assert_eq!(paths(&model), ["type"]);
    Ok(())
}

#[test]
fn merge_round_trip_through_the_generated_impl() -> TestResult {
    let base = VarMap::new();
    let mut model = model(4, 1, vb(&base))?;
    model.init_adapter(&VarMap::new())?;
    model.merge()?;
    assert!(model.is_merged());
    model.unmerge()?;
    assert!(!model.is_merged());
    Ok(())
}

/// `tests/user_crate` depends on `lora` only; the generated code must not need `lora-macros`,
/// `lora-runtime` or candle as direct dependencies.
#[test]
#[ignore = "checks a separate crate: about 60 s on a cold target dir; run with `--ignored`"]
fn user_crate_depends_only_on_lora() -> TestResult {
    let root = env!("CARGO_MANIFEST_DIR");
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| format!("{root}/target"));
    let output = std::process::Command::new(env!("CARGO"))
        .args(["check", "--offline", "--quiet", "--manifest-path"])
        .arg(format!("{root}/tests/user_crate/Cargo.toml"))
        .env("CARGO_TARGET_DIR", format!("{target}/user_crate"))
        .output()?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// A recursive model: the bound `Option<Box<Chain>>: LoraModel` must not send the trait solver
/// into a cycle.
#[lora(rank = 1, targets = ["proj"])]
struct Chain {
    proj: Linear,
    #[lora(nested)]
    next: Option<Box<Chain>>,
}

#[test]
fn recursive_struct() -> TestResult {
    let base = VarMap::new();
    let vb = vb(&base);
    let chain = Chain {
        proj: linear_no_bias(2, 2, vb.pp("a"))?.into(),
        next: Some(Box::new(Chain {
            proj: linear_no_bias(2, 2, vb.pp("b"))?.into(),
            next: None,
        })),
    };
    assert_eq!(paths(&chain), ["proj", "next.proj"]);
    Ok(())
}

#[lora(rank = 2, alpha = 4, dora, targets = ["proj"])]
struct DoraBlock {
    proj: Linear,
}

/// `dora` on the attribute: `init_adapter` gives DoRA adapters (magnitude = the weight's row
/// norms, so the output is unchanged), whose magnitude trains and is named as in PEFT.
#[test]
fn dora_argument_makes_dora_adapters() -> TestResult {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (6, 4), &dev)?;
    let mut block = DoraBlock {
        proj: Linear::new(w, None).into(),
    };
    let x = Tensor::randn(0f32, 1.0, (3, 4), &dev)?;
    let y0 = block.proj.forward(&x)?;
    block.init_adapter(&VarMap::new())?;
    let configs: Vec<LayerConfig> = block
        .lora_layers()
        .into_iter()
        .filter_map(|(_, _, c)| c)
        .collect();
    assert_eq!(configs, [LayerConfig::new(2, 4.0).with_dora(true)]);
    assert!(block.proj.adapter().is_some_and(|a| a.is_dora()));
    let names: Vec<String> = block
        .named_trainable_vars()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names,
        [
            "base_model.model.proj.lora_A.weight",
            "base_model.model.proj.lora_B.weight",
            "base_model.model.proj.lora_magnitude_vector"
        ]
    );
    let diff = (block.proj.forward(&x)? - y0)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(diff < 1e-5, "{diff}");
    Ok(())
}
