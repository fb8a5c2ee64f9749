//! What to emit when the input has errors: the errors, the user's item unchanged (minus the
//! field attributes only this macro understands) and a stub `LoraModel` impl, so one mistake in
//! the attribute does not cascade into "no method `merge`" errors wherever the model is used.

use proc_macro2::{Span, TokenStream};
use quote::quote;
use syn::DeriveInput;

use crate::ast::strip_lora_attrs;

/// `errors` as `compile_error!`s, then `original` as written and a never-called impl.
pub(crate) fn expand(original: &DeriveInput, krate: &syn::Path, errors: syn::Error) -> TokenStream {
    let errors = errors.into_compile_error();
    let mut item = original.clone();
    strip_lora_attrs(&mut item);
    let stub = stub_impl(&item, krate);
    quote! {
        #errors
        #item
        #stub
    }
}

/// `#[lora]` on something that is not a struct: the error and the item unchanged.
pub(crate) fn not_a_struct(item: TokenStream) -> TokenStream {
    let error = syn::Error::new(
        Span::call_site(),
        "`#[lora]` goes on a struct with named fields, like `struct Attention { q_proj: Linear }`",
    )
    .into_compile_error();
    quote! {
        #error
        #item
    }
}

fn stub_impl(item: &DeriveInput, krate: &syn::Path) -> TokenStream {
    let name = &item.ident;
    let (impl_generics, ty_generics, where_clause) = item.generics.split_for_impl();
    quote! {
        const _: () = {
            #[automatically_derived]
            impl #impl_generics #krate::__private::LoraModel for #name #ty_generics #where_clause {
                fn visit_lora_layers<'__a>(
                    &'__a self,
                    _: &mut #krate::__private::ModulePath,
                    _: &mut #krate::__private::VisitFn<'__a, '_>,
                ) -> #krate::__private::Result<()> {
                    ::core::unreachable!()
                }
                fn visit_lora_layers_mut(
                    &mut self,
                    _: &mut #krate::__private::ModulePath,
                    _: &mut #krate::__private::VisitMutFn<'_>,
                ) -> #krate::__private::Result<()> {
                    ::core::unreachable!()
                }
            }
        };
    }
}
