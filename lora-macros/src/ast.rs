//! Parsing: the attribute's arguments and the user's struct, turned into the macro's model.
//!
//! Everything keeps its tokens, so [`valid`](crate::valid) can point each error at the narrowest
//! token. Only mistakes of *form* are reported here (an unknown or repeated argument, a string
//! where a number belongs); whether a well-formed value is allowed is `valid`'s business.

use proc_macro2::{Span, TokenStream};
use quote::ToTokens;
use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::{Attribute, Data, DeriveInput, Expr, Fields, Ident, Lit, LitStr, Meta, Token, UnOp};

use crate::ctxt::{did_you_mean, list, Ctxt};

/// The arguments `#[lora(...)]` accepts on a struct.
pub(crate) const ARGS: &[&str] = &[
    "rank",
    "alpha",
    "targets",
    "adaptable",
    "dropout",
    "rslora",
    "dora",
    "init",
    "crate",
];

/// The user's item and the attribute's arguments.
pub(crate) struct Input<'a> {
    /// The item as the user wrote it.
    pub original: &'a DeriveInput,
    /// `#[lora(...)]`'s arguments.
    pub args: Args,
    /// What kind of item it is; only structs with named fields can be adapted.
    pub shape: Shape<'a>,
}

/// The kind of item `#[lora]` is on, with the span to blame when it is not a struct with named
/// fields.
pub(crate) enum Shape<'a> {
    /// `struct S { .. }`.
    Named(Vec<Field<'a>>),
    /// `struct S(..);`: the parentheses.
    Tuple(Span),
    /// `struct S;`: the name.
    Unit(Span),
    /// `enum`: the keyword.
    Enum(Span),
    /// `union`: the keyword.
    Union(Span),
}

/// A named field.
pub(crate) struct Field<'a> {
    /// The field as the user wrote it.
    pub original: &'a syn::Field,
    /// Its name.
    pub ident: &'a Ident,
    /// The `nested` of `#[lora(nested)]`, when present.
    pub nested: Option<Ident>,
}

/// One `key = value` of the struct's attribute: the key is kept for its span.
pub(crate) struct Arg<T> {
    /// The argument's name.
    pub key: Ident,
    /// Its parsed value.
    pub value: T,
}

/// A numeric literal, possibly negated.
pub(crate) struct Number {
    /// The tokens the user wrote, for error spans.
    pub tokens: TokenStream,
    /// Its value.
    pub value: f64,
    /// Its value when it is an integer literal that fits an `i128`.
    pub int: Option<i128>,
}

/// `targets = [..]`.
pub(crate) struct Targets {
    /// The whole list, for errors about the list itself.
    pub list: TokenStream,
    /// The field names, in order.
    pub names: Vec<LitStr>,
    /// Whether the list is `[]` (as opposed to holding only invalid entries).
    pub empty: bool,
}

/// The struct-level arguments; `None` when absent.
#[derive(Default)]
pub(crate) struct Args {
    /// `rank = 8`.
    pub rank: Option<Arg<Number>>,
    /// `alpha = 16` or `alpha = 16.0`.
    pub alpha: Option<Arg<Number>>,
    /// `targets = ["q_proj", "v_proj"]`.
    pub targets: Option<Arg<Targets>>,
    /// `adaptable = ["k_proj", "o_proj"]`: layer fields that can take adapters created at run
    /// time, with no default adapter.
    pub adaptable: Option<Arg<Targets>>,
    /// `dropout = 0.05`.
    pub dropout: Option<Arg<Number>>,
    /// `rslora = true`, or `rslora` alone.
    pub rslora: Option<Arg<bool>>,
    /// `dora = true`, or `dora` alone: DoRA adapters (PEFT's `use_dora`).
    pub dora: Option<Arg<bool>>,
    /// `init = "gaussian"`.
    pub init: Option<Arg<LitStr>>,
    /// `crate = "lora_runtime"`.
    pub krate: Option<Arg<syn::Path>>,
    /// Every known argument written, even with an invalid value, so that a bad `rank` is not
    /// also reported as a missing one.
    pub seen: Vec<&'static str>,
}

impl Args {
    /// Whether the user wrote `name`, valid or not.
    pub(crate) fn written(&self, name: &str) -> bool {
        self.seen.contains(&name)
    }

    /// The path of the runtime crate: `crate = ".."` or `::lora`.
    pub(crate) fn krate(&self) -> syn::Path {
        match &self.krate {
            Some(arg) => arg.value.clone(),
            None => syn::parse_quote!(::lora),
        }
    }
}

impl<'a> Input<'a> {
    /// Parses the attribute's arguments and the item, reporting mistakes of form to `cx`.
    pub(crate) fn from_syn(original: &'a DeriveInput, attr: TokenStream, cx: &mut Ctxt) -> Self {
        let args = parse_args(attr, cx);
        for attr in original.attrs.iter().filter(|a| is_lora_attr(a)) {
            cx.error_spanned(
                attr,
                "duplicate `#[lora]` attribute: merge the arguments into a single `#[lora(...)]`",
            );
        }
        let shape = match &original.data {
            Data::Struct(data) => match &data.fields {
                Fields::Named(fields) => Shape::Named(
                    fields
                        .named
                        .iter()
                        .filter_map(|field| Field::from_syn(field, cx))
                        .collect(),
                ),
                Fields::Unnamed(fields) => Shape::Tuple(fields.paren_token.span.join()),
                Fields::Unit => Shape::Unit(original.ident.span()),
            },
            Data::Enum(data) => Shape::Enum(data.enum_token.span),
            Data::Union(data) => Shape::Union(data.union_token.span),
        };
        Input {
            original,
            args,
            shape,
        }
    }
}

impl<'a> Field<'a> {
    fn from_syn(original: &'a syn::Field, cx: &mut Ctxt) -> Option<Self> {
        let ident = original.ident.as_ref()?;
        let mut nested = None;
        for attr in original.attrs.iter().filter(|a| is_lora_attr(a)) {
            let list = match &attr.meta {
                Meta::List(list) => list,
                meta => {
                    cx.error_spanned(
                        meta,
                        "`#[lora]` on a field needs an argument: write `#[lora(nested)]` when the \
                         field is itself a LoRA model, or list the field in the struct's `targets`",
                    );
                    continue;
                }
            };
            for arg in parse_raw(list.tokens.clone(), cx) {
                let key = arg.key.unraw().to_string();
                match key.as_str() {
                    "nested" if nested.is_some() => cx.error(
                        arg.key.span(),
                        "duplicate field argument `nested`: remove one of them",
                    ),
                    "nested" => match arg.value {
                        Some(value) => cx.error_spanned(
                            value,
                            "`nested` takes no value: write `#[lora(nested)]`",
                        ),
                        None => nested = Some(arg.key),
                    },
                    _ => cx.error(
                        arg.key.span(),
                        format_args!(
                            "unknown field argument `{key}`: the only one is `nested`, for a field \
                             that is itself a LoRA model; layers to adapt go in the struct's `targets`"
                        ),
                    ),
                }
            }
        }
        Some(Field {
            original,
            ident,
            nested,
        })
    }
}

/// Whether `attr` is `#[lora]` / `#[lora(...)]`.
pub(crate) fn is_lora_attr(attr: &Attribute) -> bool {
    attr.path().is_ident("lora")
}

/// Removes every `#[lora(...)]` from the fields (and from a duplicate on the item), so the item
/// can be emitted again without triggering the macro twice or an unknown-attribute error.
pub(crate) fn strip_lora_attrs(item: &mut DeriveInput) {
    item.attrs.retain(|a| !is_lora_attr(a));
    let fields: Box<dyn Iterator<Item = &mut syn::Field>> = match &mut item.data {
        Data::Struct(data) => Box::new(data.fields.iter_mut()),
        Data::Enum(data) => Box::new(data.variants.iter_mut().flat_map(|v| v.fields.iter_mut())),
        Data::Union(data) => Box::new(data.fields.named.iter_mut()),
    };
    for field in fields {
        field.attrs.retain(|a| !is_lora_attr(a));
    }
}

/// `key` or `key = value`, the key possibly a keyword (`crate`).
struct RawArg {
    key: Ident,
    value: Option<Expr>,
}

impl Parse for RawArg {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let key = Ident::parse_any(input)?;
        if !input.is_empty() && !input.peek(Token![=]) && !input.peek(Token![,]) {
            let name = key.unraw().to_string();
            return Err(input.error(format_args!(
                "expected `=` after `{name}`, like `{name} = {}`",
                example(&name)
            )));
        }
        let value = if input.peek(Token![=]) {
            input.parse::<Token![=]>()?;
            Some(input.parse()?)
        } else {
            None
        };
        Ok(RawArg { key, value })
    }
}

fn parse_raw(tokens: TokenStream, cx: &mut Ctxt) -> Vec<RawArg> {
    match Punctuated::<RawArg, Token![,]>::parse_terminated.parse2(tokens) {
        Ok(args) => args.into_iter().collect(),
        Err(error) => {
            cx.push(error);
            Vec::new()
        }
    }
}

fn parse_args(attr: TokenStream, cx: &mut Ctxt) -> Args {
    let mut args = Args::default();
    for RawArg { key, value } in parse_raw(attr, cx) {
        let name = key.unraw().to_string();
        let duplicate = match name.as_str() {
            "rank" => args.rank.is_some(),
            "alpha" => args.alpha.is_some(),
            "targets" => args.targets.is_some(),
            "adaptable" => args.adaptable.is_some(),
            "dropout" => args.dropout.is_some(),
            "rslora" => args.rslora.is_some(),
            "dora" => args.dora.is_some(),
            "init" => args.init.is_some(),
            "crate" => args.krate.is_some(),
            "nested" => {
                cx.error(
                    key.span(),
                    "`nested` is a field argument: write `#[lora(nested)]` on the field that is \
                     itself a LoRA model",
                );
                continue;
            }
            _ => {
                cx.error(
                    key.span(),
                    format_args!(
                        "unknown argument `{name}`: expected {}{}",
                        list(ARGS.iter().copied(), "or"),
                        did_you_mean(&name, ARGS.iter().copied()),
                    ),
                );
                continue;
            }
        };
        if duplicate {
            cx.error(
                key.span(),
                format_args!("duplicate argument `{name}`: remove one of them"),
            );
            continue;
        }
        if let Some(known) = ARGS.iter().find(|a| **a == name) {
            args.seen.push(known);
        }
        // `rslora` alone means `rslora = true`, `dora` alone `dora = true`; every other
        // argument needs a value.
        if name == "rslora" && value.is_none() {
            args.rslora = Some(Arg { key, value: true });
            continue;
        }
        if name == "dora" && value.is_none() {
            args.dora = Some(Arg { key, value: true });
            continue;
        }
        let Some(value) = value else {
            cx.error(
                key.span(),
                format_args!("`{name}` needs a value, like `{name} = {}`", example(&name)),
            );
            continue;
        };
        let expected = || format!("like `{name} = {}`", example(&name));
        match name.as_str() {
            "rank" => match number(&value) {
                Some(n) if n.int.is_some() => args.rank = Some(Arg { key, value: n }),
                _ => cx.error_spanned(
                    value,
                    format_args!("`rank` must be an integer literal, {}", expected()),
                ),
            },
            "alpha" | "dropout" => match number(&value) {
                Some(n) if name == "alpha" => args.alpha = Some(Arg { key, value: n }),
                Some(n) => args.dropout = Some(Arg { key, value: n }),
                None => cx.error_spanned(
                    value,
                    format_args!("`{name}` must be a number literal, {}", expected()),
                ),
            },
            "targets" => {
                if let Some(targets) = targets(&value, "targets", cx) {
                    args.targets = Some(Arg {
                        key,
                        value: targets,
                    });
                }
            }
            "adaptable" => {
                if let Some(names) = targets(&value, "adaptable", cx) {
                    args.adaptable = Some(Arg { key, value: names });
                }
            }
            "rslora" => match lit(&value) {
                Some(Lit::Bool(b)) => {
                    args.rslora = Some(Arg {
                        key,
                        value: b.value,
                    })
                }
                _ => cx.error_spanned(
                    value,
                    "`rslora` must be `true` or `false`, like `rslora = true`",
                ),
            },
            "dora" => match lit(&value) {
                Some(Lit::Bool(b)) => {
                    args.dora = Some(Arg {
                        key,
                        value: b.value,
                    })
                }
                _ => cx.error_spanned(
                    value,
                    "`dora` must be `true` or `false`, like `dora = true`",
                ),
            },
            "init" => match lit(&value) {
                Some(Lit::Str(s)) => {
                    args.init = Some(Arg {
                        key,
                        value: s.clone(),
                    })
                }
                _ => cx.error_spanned(
                    value,
                    "`init` must be a string literal, like `init = \"gaussian\"`",
                ),
            },
            _ => match lit(&value) {
                Some(Lit::Str(s)) => match s.parse::<syn::Path>() {
                    Ok(path) => args.krate = Some(Arg { key, value: path }),
                    Err(_) => cx.error(
                        s.span(),
                        format_args!(
                            "`crate` must name a crate path, like `crate = \"lora\"`, not `{}`",
                            s.value()
                        ),
                    ),
                },
                _ => cx.error_spanned(
                    value,
                    "`crate` must be a string literal, like `crate = \"lora_runtime\"`",
                ),
            },
        }
    }
    args
}

fn example(name: &str) -> &'static str {
    match name {
        "rank" => "8",
        "alpha" => "16",
        "targets" | "adaptable" => "[\"q_proj\", \"v_proj\"]",
        "dropout" => "0.05",
        "init" => "\"gaussian\"",
        "crate" => "\"lora_runtime\"",
        _ => "true",
    }
}

/// The literal in `expr`, looking through the invisible groups of `macro_rules!` fragments.
fn lit(expr: &Expr) -> Option<&Lit> {
    match expr {
        Expr::Lit(lit) => Some(&lit.lit),
        Expr::Group(group) => lit(&group.expr),
        _ => None,
    }
}

fn number(expr: &Expr) -> Option<Number> {
    let tokens = expr.to_token_stream();
    match expr {
        Expr::Unary(unary) if matches!(unary.op, UnOp::Neg(_)) => {
            let n = number(&unary.expr)?;
            Some(Number {
                tokens,
                value: -n.value,
                int: n.int.map(|i| -i),
            })
        }
        Expr::Group(group) => number(&group.expr),
        Expr::Paren(paren) => number(&paren.expr),
        _ => match lit(expr)? {
            Lit::Int(int) => Some(Number {
                tokens,
                value: int.base10_parse().ok()?,
                int: int.base10_parse().ok(),
            }),
            Lit::Float(float) => Some(Number {
                tokens,
                value: float.base10_parse().ok()?,
                int: None,
            }),
            _ => None,
        },
    }
}

/// A list of field names: `targets = [..]` or `adaptable = [..]` (`arg`).
fn targets(value: &Expr, arg: &str, cx: &mut Ctxt) -> Option<Targets> {
    let Expr::Array(array) = value else {
        let hint = match lit(value) {
            Some(Lit::Str(s)) => format!("`{arg} = [\"{}\"]`", s.value()),
            _ => format!("`{arg} = [\"q_proj\", \"v_proj\"]`"),
        };
        cx.error_spanned(
            value,
            format_args!("`{arg}` must be a list of field names in brackets, like {hint}"),
        );
        return None;
    };
    let mut names = Vec::new();
    for elem in &array.elems {
        match lit(elem) {
            Some(Lit::Str(s)) => names.push(s.clone()),
            _ => {
                let hint = match elem {
                    Expr::Path(p) => format!("`\"{}\"`", p.to_token_stream()),
                    _ => "`\"q_proj\"`".to_owned(),
                };
                let what = if arg == "targets" {
                    "a target"
                } else {
                    "an adaptable layer"
                };
                cx.error_spanned(
                    elem,
                    format_args!("{what} must be a field name in quotes, like {hint}"),
                );
            }
        }
    }
    Some(Targets {
        list: array.to_token_stream(),
        names,
        empty: array.elems.is_empty(),
    })
}
