//! Error collection: every check reports here, so one compilation shows every mistake.

use std::fmt::Display;

use proc_macro2::Span;
use quote::ToTokens;

/// The errors found so far (serde_derive's `Ctxt`). Checks push and carry on; [`Ctxt::check`]
/// combines them once at the end.
#[derive(Default)]
pub(crate) struct Ctxt {
    errors: Vec<syn::Error>,
}

impl Ctxt {
    /// An empty context.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// An error at `span`.
    pub(crate) fn error(&mut self, span: Span, message: impl Display) {
        self.errors.push(syn::Error::new(span, message));
    }

    /// An error spanning `tokens` (from their first to their last token).
    pub(crate) fn error_spanned(&mut self, tokens: impl ToTokens, message: impl Display) {
        self.errors.push(syn::Error::new_spanned(tokens, message));
    }

    /// An error syn produced.
    pub(crate) fn push(&mut self, error: syn::Error) {
        self.errors.push(error);
    }

    /// `Ok` when nothing was reported, otherwise every error combined, in the order reported.
    pub(crate) fn check(self) -> Result<(), syn::Error> {
        let mut errors = self.errors.into_iter();
        let Some(mut combined) = errors.next() else {
            return Ok(());
        };
        for error in errors {
            combined.combine(error);
        }
        Err(combined)
    }
}

/// ` (did you mean `x`?)` when one of `candidates` is a likely typo of `name`, else nothing.
pub(crate) fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> String {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(name, c), c))
        .filter(|&(distance, c)| distance <= (c.chars().count() / 3).max(1))
        .min_by_key(|&(distance, _)| distance)
        .map_or_else(String::new, |(_, c)| format!(" (did you mean `{c}`?)"))
}

/// `a`, `b` or `c` (with `conjunction = "or"`), for messages that list the choices.
pub(crate) fn list<'a>(items: impl IntoIterator<Item = &'a str>, conjunction: &str) -> String {
    let items: Vec<String> = items.into_iter().map(|i| format!("`{i}`")).collect();
    match items.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} {conjunction} {last}", init.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        let fields = ["q_proj", "k_proj", "v_proj"];
        assert_eq!(did_you_mean("k_prj", fields), " (did you mean `k_proj`?)");
        assert_eq!(did_you_mean("kproj", fields), " (did you mean `k_proj`?)");
        assert_eq!(did_you_mean("mlp", fields), "");
        assert_eq!(
            did_you_mean("alhpa", ["rank", "alpha"]),
            " (did you mean `alpha`?)"
        );
        assert_eq!(list(["a", "b", "c"], "or"), "`a`, `b` or `c`");
    }
}
