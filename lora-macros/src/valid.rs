//! Validation: every rule a parsed [`Input`] must follow, all checked in one pass.
//!
//! The result is a [`Model`] that [`expand`](crate::expand) turns into code without further
//! checks. Type checks (is a target really a layer LoRA can adapt, is a nested field really a LoRA
//! model) are left to the compiler: the expansion asserts them at the field's type.

use std::collections::HashSet;

use syn::{DeriveInput, Ident, Type};

use crate::ast::{Arg, Input, Number, Shape};
use crate::ctxt::{did_you_mean, list, Ctxt};

/// What a field is to LoRA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Listed in `targets`: a layer (linear, embedding, convolution) that gets an adapter.
    Target,
    /// Listed in `adaptable`: a layer that can take an adapter created at run time.
    Adaptable,
    /// `#[lora(nested)]`: a LoRA model (or a `Vec`, `Option`, `Box` or array of them).
    Nested,
    /// Anything else: left alone.
    Plain,
}

/// The LoRA layer a target (or adaptable) field becomes, by the last segment of its type's path:
/// `LoraEmbedding` for `Embedding` (`candle_nn::Embedding`, ...) or `LoraEmbedding`, likewise for
/// `Conv1d` and `Conv2d`, and `LoraLinear` for everything else. The expansion checks the choice
/// where the user wrote the type (`assert_lora_target::<T, Layer>` requires `T: LoraTarget<Layer =
/// Layer>`), so an unsupported type is one error at the type; a type alias of an `Embedding` or a
/// convolution is an error too (write the type's own name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layer {
    Linear,
    Embedding,
    Conv1d,
    Conv2d,
}

impl Layer {
    /// The layer for a field of type `ty`.
    pub(crate) fn of(ty: &Type) -> Self {
        let last = match ty {
            Type::Path(p) if p.qself.is_none() => p.path.segments.last(),
            _ => None,
        };
        match last.map(|s| s.ident.to_string()).as_deref() {
            Some("Embedding" | "LoraEmbedding") => Self::Embedding,
            Some("Conv1d" | "LoraConv1d") => Self::Conv1d,
            Some("Conv2d" | "LoraConv2d") => Self::Conv2d,
            _ => Self::Linear,
        }
    }

    /// The runtime's layer type: `LoraLinear`, `LoraEmbedding`, `LoraConv1d` or `LoraConv2d`.
    pub(crate) fn runtime_type(self) -> &'static str {
        match self {
            Self::Linear => "LoraLinear",
            Self::Embedding => "LoraEmbedding",
            Self::Conv1d => "LoraConv1d",
            Self::Conv2d => "LoraConv2d",
        }
    }

    /// The candle layer, for messages: ``an `Embedding` ``, ...
    fn described(self) -> &'static str {
        match self {
            Self::Linear => "a `Linear`",
            Self::Embedding => "an `Embedding`",
            Self::Conv1d => "a `Conv1d`",
            Self::Conv2d => "a `Conv2d`",
        }
    }
}

/// The initialisation of `A`, as `lora_runtime::LoraInit` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Init {
    Kaiming,
    Gaussian,
}

const INITS: &[&str] = &["kaiming", "gaussian"];

/// The targets' hyper-parameters, all within range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Config {
    pub rank: usize,
    /// Positive and finite.
    pub alpha: f64,
    /// In `[0, 1)`.
    pub dropout: f32,
    pub rslora: bool,
    pub dora: bool,
    pub init: Init,
}

/// A named field, its role and, for a target or adaptable field, the layer it becomes.
pub(crate) struct Field<'a> {
    pub ident: &'a Ident,
    pub ty: &'a Type,
    pub role: Role,
    pub layer: Layer,
}

/// A struct that can be expanded.
pub(crate) struct Model<'a> {
    /// The struct as the user wrote it.
    pub original: &'a DeriveInput,
    /// The runtime crate's path.
    pub krate: syn::Path,
    /// `None` for a container without targets of its own.
    pub config: Option<Config>,
    /// The named fields in declaration order.
    pub fields: Vec<Field<'a>>,
}

/// Checks `input`, reporting every violation to `cx`. The model is only meaningful when `cx`
/// ends up empty.
pub(crate) fn check<'a>(input: &Input<'a>, cx: &mut Ctxt) -> Model<'a> {
    let name = &input.original.ident;
    let fields = match &input.shape {
        Shape::Named(fields) => fields.as_slice(),
        Shape::Tuple(span) => {
            cx.error(
                *span,
                format_args!(
                    "`#[lora]` needs named fields: LoRA layers are saved under their field names, \
                     so write `struct {name} {{ q_proj: Linear, .. }}`"
                ),
            );
            &[]
        }
        Shape::Unit(span) => {
            cx.error(
                *span,
                format_args!(
                    "`#[lora]` on a unit struct has nothing to adapt: give `{name}` named fields, \
                     like `struct {name} {{ q_proj: Linear }}`"
                ),
            );
            &[]
        }
        Shape::Enum(span) => {
            cx.error(
                *span,
                "`#[lora]` cannot adapt an enum: use a struct with named fields (an `Option` \
                 field marked `#[lora(nested)]` covers layers that may be absent)",
            );
            &[]
        }
        Shape::Union(span) => {
            cx.error(
                *span,
                "`#[lora]` cannot adapt a union: use a struct with named fields",
            );
            &[]
        }
    };

    let config = config(input, cx);

    let mut roles: Vec<Role> = fields
        .iter()
        .map(|f| {
            if f.nested.is_some() {
                Role::Nested
            } else {
                Role::Plain
            }
        })
        .collect();
    if let Shape::Named(_) = &input.shape {
        let lists = [
            (&input.args.targets, Role::Target),
            (&input.args.adaptable, Role::Adaptable),
        ];
        for (arg, role) in lists {
            if let Some(arg) = arg {
                assign(name, fields, &arg.value.names, role, &mut roles, cx);
            }
        }
    }
    if let Some(adaptable) = &input.args.adaptable {
        if adaptable.value.empty {
            cx.error_spanned(
                &adaptable.value.list,
                "`adaptable` is empty: list the layer fields that can take adapters at run \
                 time, like `adaptable = [\"k_proj\", \"o_proj\"]`, or remove it",
            );
        }
    }

    // DoRA is a linear layer's: the runtime refuses it on the other kinds, so say so here.
    if config.as_ref().is_some_and(|c| c.dora) {
        for (f, _) in fields
            .iter()
            .zip(&roles)
            .filter(|(_, r)| **r == Role::Target)
        {
            let layer = Layer::of(&f.original.ty);
            if layer != Layer::Linear {
                cx.error_spanned(
                    &f.original.ty,
                    format_args!(
                        "`dora` applies to linear targets only: `{}` is {} (DoRA on embedding \
                         and convolution layers is not supported); remove `dora`, or remove \
                         `{}` from `targets`",
                        f.ident,
                        layer.described(),
                        f.ident
                    ),
                );
            }
        }
    }

    Model {
        original: input.original,
        krate: input.args.krate(),
        config,
        fields: fields
            .iter()
            .zip(roles)
            .map(|(f, role)| Field {
                ident: f.ident,
                ty: &f.original.ty,
                role,
                layer: Layer::of(&f.original.ty),
            })
            .collect(),
    }
}

fn config(input: &Input, cx: &mut Ctxt) -> Option<Config> {
    let args = &input.args;
    let Some(targets) = &args.targets else {
        if args.written("targets") {
            return None; // invalid, already reported
        }
        // Hyper-parameters without targets would silently do nothing.
        let keys = [
            args.rank.as_ref().map(|a| &a.key),
            args.alpha.as_ref().map(|a| &a.key),
            args.dropout.as_ref().map(|a| &a.key),
            args.rslora.as_ref().map(|a| &a.key),
            args.dora.as_ref().map(|a| &a.key),
            args.init.as_ref().map(|a| &a.key),
        ];
        for key in keys.into_iter().flatten() {
            let adaptable = if args.adaptable.is_some() {
                " (`adaptable` layers get theirs at run time, from `InitOptions`)"
            } else {
                ""
            };
            cx.error(
                key.span(),
                format_args!(
                    "`{key}` has no effect without `targets`{adaptable}: list the layer fields \
                     to adapt, like `targets = [\"q_proj\", \"v_proj\"]`, or remove `{key}`"
                ),
            );
        }
        return None;
    };
    if targets.value.empty {
        cx.error_spanned(
            &targets.value.list,
            "`targets` is empty: list the layer fields to adapt, like \
             `targets = [\"q_proj\", \"v_proj\"]`, or remove `targets` for a container",
        );
    }
    let rank = match &args.rank {
        None if args.written("rank") => None, // invalid, already reported
        None => {
            cx.error(
                targets.key.span(),
                "missing `rank` for these targets: add it, like `rank = 8`",
            );
            None
        }
        Some(Arg {
            value: Number { tokens, int, .. },
            ..
        }) => match int.and_then(|i| usize::try_from(i).ok()) {
            Some(0) | None => {
                cx.error_spanned(
                    tokens,
                    "`rank` must be at least 1: it is the inner dimension of the adapter, \
                         typically 4 to 64",
                );
                None
            }
            rank => rank,
        },
    };
    let alpha = match &args.alpha {
        None => 8.0,
        Some(Arg {
            value: Number { tokens, value, .. },
            ..
        }) => {
            if value.is_infinite() {
                cx.error_spanned(tokens, "`alpha` is too large: write a finite number");
            } else if *value <= 0.0 {
                cx.error_spanned(
                    tokens,
                    "`alpha` must be positive: the adapter is scaled by `alpha / rank`, so \
                     `alpha = 16` with `rank = 8` doubles it",
                );
            }
            *value
        }
    };
    let dropout = match &args.dropout {
        None => 0.0,
        Some(Arg {
            value: Number { tokens, value, .. },
            ..
        }) => {
            // Checked as `f32` too: `0.99999999999` rounds to 1.
            let dropout = *value as f32;
            if !(*value >= 0.0 && (0.0..1.0).contains(&dropout)) {
                cx.error_spanned(
                    tokens,
                    "`dropout` must be at least 0 and below 1: it is the probability of zeroing \
                     an input of the adapter, like `dropout = 0.05`",
                );
            }
            dropout
        }
    };
    let init = match &args.init {
        None => Init::Kaiming,
        Some(Arg { value, .. }) => match value.value().as_str() {
            "kaiming" => Init::Kaiming,
            "gaussian" => Init::Gaussian,
            scheme => {
                cx.error(
                    value.span(),
                    format_args!(
                        "unknown init scheme `{scheme}`: expected `\"kaiming\"` (the default) \
                         or `\"gaussian\"`{}",
                        did_you_mean(scheme, INITS.iter().copied()),
                    ),
                );
                Init::Kaiming
            }
        },
    };
    Some(Config {
        rank: rank?,
        alpha,
        dropout,
        rslora: args.rslora.as_ref().is_some_and(|a| a.value),
        dora: args.dora.as_ref().is_some_and(|a| a.value),
        init,
    })
}

/// Gives the fields named in `names` (a `targets` or `adaptable` list) their `role`, reporting
/// unknown, repeated, nested and doubly listed names.
fn assign(
    name: &Ident,
    fields: &[crate::ast::Field],
    names: &[syn::LitStr],
    role: Role,
    roles: &mut [Role],
    cx: &mut Ctxt,
) {
    let (what, arg) = match role {
        Role::Target => ("target", "targets"),
        _ => ("adaptable layer", "adaptable"),
    };
    let mut seen = HashSet::new();
    for lit in names {
        let target = lit.value();
        if !seen.insert(target.clone()) {
            cx.error(
                lit.span(),
                format_args!("duplicate {what} `{target}`: remove one of them"),
            );
            continue;
        }
        let Some(index) = fields.iter().position(|f| f.ident == target.as_str()) else {
            let names: Vec<String> = fields.iter().map(|f| f.ident.to_string()).collect();
            let mut hint = did_you_mean(&target, names.iter().map(String::as_str));
            if hint.is_empty() && !names.is_empty() && names.len() <= 8 {
                hint = format!(
                    "; its fields are {}",
                    list(names.iter().map(String::as_str), "and")
                );
            }
            cx.error(
                lit.span(),
                format_args!(
                    "unknown {what} `{target}`: `{name}` has no field named `{target}`{hint}"
                ),
            );
            continue;
        };
        if let Some(nested) = &fields[index].nested {
            cx.error(
                nested.span(),
                format_args!(
                    "`{target}` is both {} and `#[lora(nested)]`: {} is a layer (linear, \
                     embedding or convolution), a \
                     nested field a LoRA model; remove `{target}` from `{arg}` or remove \
                     `#[lora(nested)]`",
                    if role == Role::Target {
                        "a target"
                    } else {
                        "adaptable"
                    },
                    if role == Role::Target {
                        "a target"
                    } else {
                        "an adaptable layer"
                    },
                ),
            );
        }
        if roles[index] == Role::Target && role == Role::Adaptable {
            cx.error(
                lit.span(),
                format_args!(
                    "`{target}` is in both `targets` and `adaptable`: a target is already \
                     adaptable (it also gets the default adapter); remove it from `adaptable`"
                ),
            );
            continue;
        }
        roles[index] = role;
    }
}
