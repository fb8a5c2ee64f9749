//! Expansion: a validated [`Model`] becomes the struct (each target retyped to its LoRA layer:
//! `LoraLinear` for a `Linear`, `LoraEmbedding` for an `Embedding`, ..., see
//! [`Layer`](crate::valid::Layer)) and a `LoraModel` impl that visits the fields in declaration
//! order. Nothing here can fail.

use proc_macro2::{Literal, Span, TokenStream, TokenTree};
use quote::{quote, quote_spanned, ToTokens};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, GenericParam, LitStr};

use crate::ast::{self, strip_lora_attrs};
use crate::ctxt::Ctxt;
use crate::fallback;
use crate::valid::{self, Init, Model, Role};

/// `#[lora(attr)] item`: the expansion, or the errors and `item` unchanged.
pub fn lora(attr: TokenStream, item: TokenStream) -> TokenStream {
    let Ok(input) = syn::parse2::<DeriveInput>(item.clone()) else {
        return fallback::not_a_struct(item);
    };
    let mut cx = Ctxt::new();
    let parsed = ast::Input::from_syn(&input, attr, &mut cx);
    let model = valid::check(&parsed, &mut cx);
    match cx.check() {
        Ok(()) => expand(&model),
        Err(errors) => fallback::expand(&input, &model.krate, errors),
    }
}

fn expand(model: &Model) -> TokenStream {
    let krate = &model.krate;
    let private = quote!(#krate::__private);

    let mut item = model.original.clone();
    strip_lora_attrs(&mut item);
    if let Data::Struct(data) = &mut item.data {
        if let Fields::Named(fields) = &mut data.fields {
            for (field, checked) in fields.named.iter_mut().zip(&model.fields) {
                if matches!(checked.role, Role::Target | Role::Adaptable) {
                    let span = field.ty.span();
                    let layer = syn::Ident::new(checked.layer.runtime_type(), span);
                    field.ty = syn::parse_quote_spanned!(span=> #private::#layer);
                }
            }
        }
    }

    let config = model.config.map(|c| {
        let rank = Literal::usize_unsuffixed(c.rank);
        let alpha = Literal::f64_unsuffixed(c.alpha);
        let dropout = Literal::f32_unsuffixed(c.dropout);
        let rslora = c.rslora;
        let dora = c.dora;
        let init = match c.init {
            Init::Kaiming => quote!(Kaiming),
            Init::Gaussian => quote!(Gaussian),
        };
        quote! {
            const __CONFIG: #private::LayerConfig = #private::LayerConfig {
                rank: #rank,
                alpha: #alpha,
                dropout: #dropout,
                use_rslora: #rslora,
                init: #private::LoraInit::#init,
                use_dora: #dora,
                adalora: ::core::option::Option::None,
            };
        }
    });

    // Type and const parameters: nested fields whose type mentions one get a where bound.
    let params: Vec<String> = model
        .original
        .generics
        .params
        .iter()
        .filter_map(|p| match p {
            GenericParam::Type(t) => Some(t.ident.to_string()),
            GenericParam::Const(c) => Some(c.ident.to_string()),
            GenericParam::Lifetime(_) => None,
        })
        .collect();
    let mut generics = model.original.generics.clone();
    let mut asserts = Vec::new();
    let mut visits = Vec::new();
    let mut visits_mut = Vec::new();
    for field in &model.fields {
        let (ident, ty) = (field.ident, field.ty);
        let name = LitStr::new(&ident.unraw().to_string(), ident.span());
        // Located at the type, so a wrong type is reported there; resolved at the call site,
        // like the rest of the expansion.
        let span = Span::call_site().located_at(ty.span());
        match field.role {
            Role::Target | Role::Adaptable => {
                // A target has the struct's default adapter config; an adaptable layer none.
                let config = if field.role == Role::Target {
                    quote!(::core::option::Option::Some(&__CONFIG))
                } else {
                    quote!(::core::option::Option::None)
                };
                // Checks that the type is a target and that `Layer::of` chose its layer.
                let layer = syn::Ident::new(field.layer.runtime_type(), ty.span());
                asserts.push(quote_spanned!(span=>
                    #private::assert_lora_target::<#ty, #private::#layer>();
                ));
                visits.push(quote! {
                    #private::visit_layer(__path, #name, &self.#ident, #config, __f)?;
                });
                visits_mut.push(quote! {
                    #private::visit_layer_mut(__path, #name, &mut self.#ident, #config, __f)?;
                });
            }
            Role::Nested => {
                if mentions(ty.to_token_stream(), &params) {
                    let bound = respan_over(quote!(#private::LoraModel), ty);
                    // Generic: the bound is needed, and rustc reports it at the type.
                    let predicates = &mut generics.make_where_clause().predicates;
                    predicates.push(syn::parse_quote!(#ty: #bound));
                } else {
                    // Not a bound: on a concrete type it would send recursive models
                    // (`next: Option<Box<Self>>`) into a trait-solver cycle.
                    asserts.push(quote_spanned!(span=> #private::assert_lora_model::<#ty>();));
                }
                // With the turbofish, rustc reports a call's unmet bound at `#ty`, like the
                // assertion in the same body, and folds the two into one error; the assertions
                // are identical in both visitors, so those two are folded as well.
                visits.push(quote! {
                    #private::visit_nested::<#ty>(__path, #name, &self.#ident, __f)?;
                });
                visits_mut.push(quote! {
                    #private::visit_nested_mut::<#ty>(__path, #name, &mut self.#ident, __f)?;
                });
            }
            Role::Plain => {}
        }
    }

    let name = &item.ident;
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
    quote! {
        #item
        const _: () = {
            #config
            #[automatically_derived]
            impl #impl_generics #private::LoraModel for #name #ty_generics #where_clause {
                fn visit_lora_layers<'__a>(
                    &'__a self,
                    __path: &mut #private::ModulePath,
                    __f: &mut #private::VisitFn<'__a, '_>,
                ) -> #private::Result<()> {
                    #(#asserts)*
                    #(#visits)*
                    ::core::result::Result::Ok(())
                }
                fn visit_lora_layers_mut(
                    &mut self,
                    __path: &mut #private::ModulePath,
                    __f: &mut #private::VisitMutFn<'_>,
                ) -> #private::Result<()> {
                    #(#asserts)*
                    #(#visits_mut)*
                    ::core::result::Result::Ok(())
                }
            }
        };
    }
}

/// `tokens` moved over the tokens of `over`: the first onto its first token, the rest onto its
/// last, so that an error about `tokens` underlines all of `over`, as the user wrote it.
fn respan_over(tokens: TokenStream, over: &impl ToTokens) -> TokenStream {
    let mut over = over.to_token_stream().into_iter();
    let Some(first) = over.next() else {
        return tokens;
    };
    let (start, end) = (first.span(), over.last().map_or(first.span(), |t| t.span()));
    tokens
        .into_iter()
        .enumerate()
        .map(|(i, mut token)| {
            token.set_span(if i == 0 { start } else { end });
            token
        })
        .collect()
}

/// Whether `tokens` name one of `params`.
fn mentions(tokens: TokenStream, params: &[String]) -> bool {
    tokens.into_iter().any(|token| match token {
        TokenTree::Ident(ident) => params.contains(&ident.to_string()),
        TokenTree::Group(group) => mentions(group.stream(), params),
        TokenTree::Punct(_) | TokenTree::Literal(_) => false,
    })
}

#[cfg(test)]
#[path = "expand_tests.rs"]
mod tests;
