//! Snapshots of what users get. Update with `UPDATE_EXPECT=1 cargo test -p lora-macros`.

use expect_test::{expect, Expect};
use quote::quote;

use super::lora;

fn check(attr: proc_macro2::TokenStream, item: proc_macro2::TokenStream, expected: Expect) {
    let output = lora(attr, item);
    let file = syn::parse2::<syn::File>(output).unwrap();
    expected.assert_eq(&prettyplease::unparse(&file));
}

#[test]
fn targets() {
    check(
        quote!(rank = 8, alpha = 16, targets = ["q_proj", "v_proj"]),
        quote! {
            /// Self-attention.
            #[derive(Debug, Clone)]
            pub struct Attention {
                q_proj: Linear,
                k_proj: Linear,
                pub(crate) v_proj: candle_nn::Linear,
            }
        },
        expect![[r#"
            /// Self-attention.
            #[derive(Debug, Clone)]
            pub struct Attention {
                q_proj: ::lora::__private::LoraLinear,
                k_proj: Linear,
                pub(crate) v_proj: ::lora::__private::LoraLinear,
            }
            const _: () = {
                const __CONFIG: ::lora::__private::LayerConfig = ::lora::__private::LayerConfig {
                    rank: 8,
                    alpha: 16.0,
                    dropout: 0.0,
                    use_rslora: false,
                    init: ::lora::__private::LoraInit::Kaiming,
                    use_dora: false,
                    adalora: ::core::option::Option::None,
                };
                #[automatically_derived]
                impl ::lora::__private::LoraModel for Attention {
                    fn visit_lora_layers<'__a>(
                        &'__a self,
                        __path: &mut ::lora::__private::ModulePath,
                        __f: &mut ::lora::__private::VisitFn<'__a, '_>,
                    ) -> ::lora::__private::Result<()> {
                        ::lora::__private::assert_lora_target::<
                            Linear,
                            ::lora::__private::LoraLinear,
                        >();
                        ::lora::__private::assert_lora_target::<
                            candle_nn::Linear,
                            ::lora::__private::LoraLinear,
                        >();
                        ::lora::__private::visit_layer(
                            __path,
                            "q_proj",
                            &self.q_proj,
                            ::core::option::Option::Some(&__CONFIG),
                            __f,
                        )?;
                        ::lora::__private::visit_layer(
                            __path,
                            "v_proj",
                            &self.v_proj,
                            ::core::option::Option::Some(&__CONFIG),
                            __f,
                        )?;
                        ::core::result::Result::Ok(())
                    }
                    fn visit_lora_layers_mut(
                        &mut self,
                        __path: &mut ::lora::__private::ModulePath,
                        __f: &mut ::lora::__private::VisitMutFn<'_>,
                    ) -> ::lora::__private::Result<()> {
                        ::lora::__private::assert_lora_target::<
                            Linear,
                            ::lora::__private::LoraLinear,
                        >();
                        ::lora::__private::assert_lora_target::<
                            candle_nn::Linear,
                            ::lora::__private::LoraLinear,
                        >();
                        ::lora::__private::visit_layer_mut(
                            __path,
                            "q_proj",
                            &mut self.q_proj,
                            ::core::option::Option::Some(&__CONFIG),
                            __f,
                        )?;
                        ::lora::__private::visit_layer_mut(
                            __path,
                            "v_proj",
                            &mut self.v_proj,
                            ::core::option::Option::Some(&__CONFIG),
                            __f,
                        )?;
                        ::core::result::Result::Ok(())
                    }
                }
            };
        "#]],
    );
}

/// Each supported layer type becomes its LoRA layer; the assertion checks the choice.
#[test]
fn layer_kinds() {
    check(
        quote!(rank = 4, targets = ["embed", "conv", "image", "head"]),
        quote! {
            struct Model {
                embed: candle_nn::Embedding,
                conv: Conv1d,
                image: candle_nn::Conv2d,
                head: LoraLinear,
            }
        },
        expect![[r#"
            struct Model {
                embed: ::lora::__private::LoraEmbedding,
                conv: ::lora::__private::LoraConv1d,
                image: ::lora::__private::LoraConv2d,
                head: ::lora::__private::LoraLinear,
            }
            const _: () = {
                const __CONFIG: ::lora::__private::LayerConfig = ::lora::__private::LayerConfig {
                    rank: 4,
                    alpha: 8.0,
                    dropout: 0.0,
                    use_rslora: false,
                    init: ::lora::__private::LoraInit::Kaiming,
                    use_dora: false,
                    adalora: ::core::option::Option::None,
                };
                #[automatically_derived]
                impl ::lora::__private::LoraModel for Model {
                    fn visit_lora_layers<'__a>(
                        &'__a self,
                        __path: &mut ::lora::__private::ModulePath,
                        __f: &mut ::lora::__private::VisitFn<'__a, '_>,
                    ) -> ::lora::__private::Result<()> {
                        ::lora::__private::assert_lora_target::<
                            candle_nn::Embedding,
                            ::lora::__private::LoraEmbedding,
                        >();
                        ::lora::__private::assert_lora_target::<
                            Conv1d,
                            ::lora::__private::LoraConv1d,
                        >();
                        ::lora::__private::assert_lora_target::<
                            candle_nn::Conv2d,
                            ::lora::__private::LoraConv2d,
                        >();
                        ::lora::__private::assert_lora_target::<
                            LoraLinear,
                            ::lora::__private::LoraLinear,
                        >();
                        ::lora::__private::visit_layer(
                            __path,
                            "embed",
                            &self.embed,
                            ::core::option::Option::Some(&__CONFIG),
                            __f,
                        )?;
                        ::lora::__private::visit_layer(
                            __path,
                            "conv",
                            &self.conv,
                            ::core::option::Option::Some(&__CONFIG),
                            __f,
                        )?;
                        ::lora::__private::visit_layer(
                            __path,
                            "image",
                            &self.image,
                            ::core::option::Option::Some(&__CONFIG),
                            __f,
                        )?;
                        ::lora::__private::visit_layer(
                            __path,
                            "head",
                            &self.head,
                            ::core::option::Option::Some(&__CONFIG),
                            __f,
                        )?;
                        ::core::result::Result::Ok(())
                    }
                    fn visit_lora_layers_mut(
                        &mut self,
                        __path: &mut ::lora::__private::ModulePath,
                        __f: &mut ::lora::__private::VisitMutFn<'_>,
                    ) -> ::lora::__private::Result<()> {
                        ::lora::__private::assert_lora_target::<
                            candle_nn::Embedding,
                            ::lora::__private::LoraEmbedding,
                        >();
                        ::lora::__private::assert_lora_target::<
                            Conv1d,
                            ::lora::__private::LoraConv1d,
                        >();
                        ::lora::__private::assert_lora_target::<
                            candle_nn::Conv2d,
                            ::lora::__private::LoraConv2d,
                        >();
                        ::lora::__private::assert_lora_target::<
                            LoraLinear,
                            ::lora::__private::LoraLinear,
                        >();
                        ::lora::__private::visit_layer_mut(
                            __path,
                            "embed",
                            &mut self.embed,
                            ::core::option::Option::Some(&__CONFIG),
                            __f,
                        )?;
                        ::lora::__private::visit_layer_mut(
                            __path,
                            "conv",
                            &mut self.conv,
                            ::core::option::Option::Some(&__CONFIG),
                            __f,
                        )?;
                        ::lora::__private::visit_layer_mut(
                            __path,
                            "image",
                            &mut self.image,
                            ::core::option::Option::Some(&__CONFIG),
                            __f,
                        )?;
                        ::lora::__private::visit_layer_mut(
                            __path,
                            "head",
                            &mut self.head,
                            ::core::option::Option::Some(&__CONFIG),
                            __f,
                        )?;
                        ::core::result::Result::Ok(())
                    }
                }
            };
        "#]],
    );
}

#[test]
fn every_argument() {
    check(
        quote!(
            rank = 4,
            alpha = 0.5,
            dropout = 0.1,
            rslora,
            dora,
            init = "gaussian",
            crate = "lora_runtime",
            targets = ["fc"]
        ),
        quote!(
            struct Mlp {
                fc: Linear,
            }
        ),
        expect![[r#"
            struct Mlp {
                fc: lora_runtime::__private::LoraLinear,
            }
            const _: () = {
                const __CONFIG: lora_runtime::__private::LayerConfig = lora_runtime::__private::LayerConfig {
                    rank: 4,
                    alpha: 0.5,
                    dropout: 0.1,
                    use_rslora: true,
                    init: lora_runtime::__private::LoraInit::Gaussian,
                    use_dora: true,
                    adalora: ::core::option::Option::None,
                };
                #[automatically_derived]
                impl lora_runtime::__private::LoraModel for Mlp {
                    fn visit_lora_layers<'__a>(
                        &'__a self,
                        __path: &mut lora_runtime::__private::ModulePath,
                        __f: &mut lora_runtime::__private::VisitFn<'__a, '_>,
                    ) -> lora_runtime::__private::Result<()> {
                        lora_runtime::__private::assert_lora_target::<
                            Linear,
                            lora_runtime::__private::LoraLinear,
                        >();
                        lora_runtime::__private::visit_layer(
                            __path,
                            "fc",
                            &self.fc,
                            ::core::option::Option::Some(&__CONFIG),
                            __f,
                        )?;
                        ::core::result::Result::Ok(())
                    }
                    fn visit_lora_layers_mut(
                        &mut self,
                        __path: &mut lora_runtime::__private::ModulePath,
                        __f: &mut lora_runtime::__private::VisitMutFn<'_>,
                    ) -> lora_runtime::__private::Result<()> {
                        lora_runtime::__private::assert_lora_target::<
                            Linear,
                            lora_runtime::__private::LoraLinear,
                        >();
                        lora_runtime::__private::visit_layer_mut(
                            __path,
                            "fc",
                            &mut self.fc,
                            ::core::option::Option::Some(&__CONFIG),
                            __f,
                        )?;
                        ::core::result::Result::Ok(())
                    }
                }
            };
        "#]],
    );
}

#[test]
fn container() {
    check(
        quote!(),
        quote! {
            pub struct Layer {
                #[lora(nested)]
                self_attn: Attention,
                norm: RmsNorm,
                #[lora(nested)]
                mlp: Option<Box<Mlp>>,
            }
        },
        expect![[r#"
            pub struct Layer {
                self_attn: Attention,
                norm: RmsNorm,
                mlp: Option<Box<Mlp>>,
            }
            const _: () = {
                #[automatically_derived]
                impl ::lora::__private::LoraModel for Layer {
                    fn visit_lora_layers<'__a>(
                        &'__a self,
                        __path: &mut ::lora::__private::ModulePath,
                        __f: &mut ::lora::__private::VisitFn<'__a, '_>,
                    ) -> ::lora::__private::Result<()> {
                        ::lora::__private::assert_lora_model::<Attention>();
                        ::lora::__private::assert_lora_model::<Option<Box<Mlp>>>();
                        ::lora::__private::visit_nested::<
                            Attention,
                        >(__path, "self_attn", &self.self_attn, __f)?;
                        ::lora::__private::visit_nested::<
                            Option<Box<Mlp>>,
                        >(__path, "mlp", &self.mlp, __f)?;
                        ::core::result::Result::Ok(())
                    }
                    fn visit_lora_layers_mut(
                        &mut self,
                        __path: &mut ::lora::__private::ModulePath,
                        __f: &mut ::lora::__private::VisitMutFn<'_>,
                    ) -> ::lora::__private::Result<()> {
                        ::lora::__private::assert_lora_model::<Attention>();
                        ::lora::__private::assert_lora_model::<Option<Box<Mlp>>>();
                        ::lora::__private::visit_nested_mut::<
                            Attention,
                        >(__path, "self_attn", &mut self.self_attn, __f)?;
                        ::lora::__private::visit_nested_mut::<
                            Option<Box<Mlp>>,
                        >(__path, "mlp", &mut self.mlp, __f)?;
                        ::core::result::Result::Ok(())
                    }
                }
            };
        "#]],
    );
}

#[test]
fn generic() {
    check(
        quote!(rank = 2, targets = ["head"]),
        quote! {
            struct Model<'a, L: Clone, const N: usize> where L: Send {
                #[lora(nested)]
                layers: [L; N],
                #[lora(nested)]
                fixed: Vec<Block>,
                head: Linear,
                name: &'a str,
            }
        },
        expect![[r#"
            struct Model<'a, L: Clone, const N: usize>
            where
                L: Send,
            {
                layers: [L; N],
                fixed: Vec<Block>,
                head: ::lora::__private::LoraLinear,
                name: &'a str,
            }
            const _: () = {
                const __CONFIG: ::lora::__private::LayerConfig = ::lora::__private::LayerConfig {
                    rank: 2,
                    alpha: 8.0,
                    dropout: 0.0,
                    use_rslora: false,
                    init: ::lora::__private::LoraInit::Kaiming,
                    use_dora: false,
                    adalora: ::core::option::Option::None,
                };
                #[automatically_derived]
                impl<'a, L: Clone, const N: usize> ::lora::__private::LoraModel for Model<'a, L, N>
                where
                    L: Send,
                    [L; N]: ::lora::__private::LoraModel,
                {
                    fn visit_lora_layers<'__a>(
                        &'__a self,
                        __path: &mut ::lora::__private::ModulePath,
                        __f: &mut ::lora::__private::VisitFn<'__a, '_>,
                    ) -> ::lora::__private::Result<()> {
                        ::lora::__private::assert_lora_model::<Vec<Block>>();
                        ::lora::__private::assert_lora_target::<
                            Linear,
                            ::lora::__private::LoraLinear,
                        >();
                        ::lora::__private::visit_nested::<
                            [L; N],
                        >(__path, "layers", &self.layers, __f)?;
                        ::lora::__private::visit_nested::<
                            Vec<Block>,
                        >(__path, "fixed", &self.fixed, __f)?;
                        ::lora::__private::visit_layer(
                            __path,
                            "head",
                            &self.head,
                            ::core::option::Option::Some(&__CONFIG),
                            __f,
                        )?;
                        ::core::result::Result::Ok(())
                    }
                    fn visit_lora_layers_mut(
                        &mut self,
                        __path: &mut ::lora::__private::ModulePath,
                        __f: &mut ::lora::__private::VisitMutFn<'_>,
                    ) -> ::lora::__private::Result<()> {
                        ::lora::__private::assert_lora_model::<Vec<Block>>();
                        ::lora::__private::assert_lora_target::<
                            Linear,
                            ::lora::__private::LoraLinear,
                        >();
                        ::lora::__private::visit_nested_mut::<
                            [L; N],
                        >(__path, "layers", &mut self.layers, __f)?;
                        ::lora::__private::visit_nested_mut::<
                            Vec<Block>,
                        >(__path, "fixed", &mut self.fixed, __f)?;
                        ::lora::__private::visit_layer_mut(
                            __path,
                            "head",
                            &mut self.head,
                            ::core::option::Option::Some(&__CONFIG),
                            __f,
                        )?;
                        ::core::result::Result::Ok(())
                    }
                }
            };
        "#]],
    );
}

#[test]
fn errors_fall_back_to_the_struct() {
    check(
        quote!(rank = 0, targets = ["q_prj"]),
        quote! {
            struct Attention {
                q_proj: Linear,
                #[lora(nested)]
                inner: Inner,
            }
        },
        expect![[r#"
            ::core::compile_error! {
                "`rank` must be at least 1: it is the inner dimension of the adapter, typically 4 to 64"
            }
            ::core::compile_error! {
                "unknown target `q_prj`: `Attention` has no field named `q_prj` (did you mean `q_proj`?)"
            }
            struct Attention {
                q_proj: Linear,
                inner: Inner,
            }
            const _: () = {
                #[automatically_derived]
                impl ::lora::__private::LoraModel for Attention {
                    fn visit_lora_layers<'__a>(
                        &'__a self,
                        _: &mut ::lora::__private::ModulePath,
                        _: &mut ::lora::__private::VisitFn<'__a, '_>,
                    ) -> ::lora::__private::Result<()> {
                        ::core::unreachable!()
                    }
                    fn visit_lora_layers_mut(
                        &mut self,
                        _: &mut ::lora::__private::ModulePath,
                        _: &mut ::lora::__private::VisitMutFn<'_>,
                    ) -> ::lora::__private::Result<()> {
                        ::core::unreachable!()
                    }
                }
            };
        "#]],
    );
}

/// The messages of the `compile_error!`s `lora` emits for `attr` on a two-field struct.
fn messages(attr: proc_macro2::TokenStream) -> String {
    let item = quote!(
        struct Attention {
            q_proj: Linear,
            #[lora(nested)]
            inner: Inner,
        }
    );
    let file = syn::parse2::<syn::File>(lora(attr, item)).unwrap();
    let mut out = String::new();
    for item in file.items {
        if let syn::Item::Macro(m) = item {
            if m.mac.path.segments.last().unwrap().ident == "compile_error" {
                let lit: syn::LitStr = m.mac.parse_body().unwrap();
                out += &lit.value();
                out += "\n";
            }
        }
    }
    out
}

#[test]
fn mistakes_of_form() {
    let cases = [
        quote!(rank = 8, targets = "q_proj"),
        quote!(rank = 8, targets = [q_proj]),
        quote!(rank: 8),
        quote!(rank, targets = ["q_proj"]),
        quote!(rank = "8", targets = ["q_proj"]),
        quote!(rank = 8, alpha = "16", targets = ["q_proj"]),
        quote!(rank = 8, rslora = 1, targets = ["q_proj"]),
        quote!(crate = "not a path"),
        quote!(crate = lora),
        quote!(nested),
        quote!(dropout = 0.1),
        quote!(rank = 8, alpha = 1e400, targets = ["q_proj"]),
        quote!(rank = 8, dropout = 0.999999999999, targets = ["q_proj"]),
        quote!(rank = 8, targets = ["inner"]),
        quote!(rank = 8, targets = ["mlp"]),
    ];
    let all: String = cases.into_iter().map(messages).collect();
    expect![[r#"
        `targets` must be a list of field names in brackets, like `targets = ["q_proj"]`
        a target must be a field name in quotes, like `"q_proj"`
        expected `=` after `rank`, like `rank = 8`
        `rank` needs a value, like `rank = 8`
        `rank` must be an integer literal, like `rank = 8`
        `alpha` must be a number literal, like `alpha = 16`
        `rslora` must be `true` or `false`, like `rslora = true`
        `crate` must name a crate path, like `crate = "lora"`, not `not a path`
        `crate` must be a string literal, like `crate = "lora_runtime"`
        `nested` is a field argument: write `#[lora(nested)]` on the field that is itself a LoRA model
        `dropout` has no effect without `targets`: list the layer fields to adapt, like `targets = ["q_proj", "v_proj"]`, or remove `dropout`
        `alpha` is too large: write a finite number
        `dropout` must be at least 0 and below 1: it is the probability of zeroing an input of the adapter, like `dropout = 0.05`
        `inner` is both a target and `#[lora(nested)]`: a target is a layer (linear, embedding or convolution), a nested field a LoRA model; remove `inner` from `targets` or remove `#[lora(nested)]`
        unknown target `mlp`: `Attention` has no field named `mlp`; its fields are `q_proj` and `inner`
    "#]]
    .assert_eq(&all);
}

#[test]
fn duplicate_attribute_and_non_structs() {
    let out = lora(
        quote!(),
        quote!(
            #[lora]
            struct S {
                #[lora]
                a: A,
                #[lora(nested = 1)]
                b: B,
            }
        ),
    );
    expect![[r#"
        ::core::compile_error! {
            "duplicate `#[lora]` attribute: merge the arguments into a single `#[lora(...)]`"
        }
        ::core::compile_error! {
            "`#[lora]` on a field needs an argument: write `#[lora(nested)]` when the field is itself a LoRA model, or list the field in the struct's `targets`"
        }
        ::core::compile_error! {
            "`nested` takes no value: write `#[lora(nested)]`"
        }
        struct S {
            a: A,
            b: B,
        }
        const _: () = {
            #[automatically_derived]
            impl ::lora::__private::LoraModel for S {
                fn visit_lora_layers<'__a>(
                    &'__a self,
                    _: &mut ::lora::__private::ModulePath,
                    _: &mut ::lora::__private::VisitFn<'__a, '_>,
                ) -> ::lora::__private::Result<()> {
                    ::core::unreachable!()
                }
                fn visit_lora_layers_mut(
                    &mut self,
                    _: &mut ::lora::__private::ModulePath,
                    _: &mut ::lora::__private::VisitMutFn<'_>,
                ) -> ::lora::__private::Result<()> {
                    ::core::unreachable!()
                }
            }
        };
    "#]]
    .assert_eq(&prettyplease::unparse(&syn::parse2(out).unwrap()));
    let out = lora(
        quote!(),
        quote!(
            fn f() {}
        ),
    );
    expect![[r#":: core :: compile_error ! { "`#[lora]` goes on a struct with named fields, like `struct Attention { q_proj: Linear }`" } fn f () { }"#]].assert_eq(&out.to_string());
}
