//! Chat templates: the Jinja programs Hugging Face models ship to turn a conversation into a prompt.
//!
//! [`render_chat`] renders one with the same engine settings as transformers'
//! `apply_chat_template`, so a prompt built here is the prompt the model was trained on:
//!
//! ```
//! use lora_models::{render_chat, Message};
//!
//! let template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.strip() }}<|im_end|>\n{% endfor %}\
//!                 {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
//! let messages = [Message::new("user", "  What is 2 + 2?  ")];
//! let prompt = render_chat(template, &messages, true, "<|im_start|>", "<|im_end|>")?;
//! assert_eq!(prompt, "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n");
//! # Ok::<(), lora_models::ModelError>(())
//! ```
//!
//! What transformers sets up, and this module too: `trim_blocks` and `lstrip_blocks`, `{% break %}`
//! and `{% continue %}`, Python's string and dict methods (`.strip()`, `.startswith()`,
//! `.items()`, ...), `raise_exception(message)`, `strftime_now(format)` and a `tojson` filter that
//! writes JSON the way Python's `json.dumps` does. `tools` and `documents` are passed as `none`.
//!
//! Not reproduced: the `{% generation %}` tag (transformers' assistant-token masks) and
//! `strftime_now` in local time (it uses UTC here).

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// One turn of a conversation, as chat templates read it: `message['role']`, `message['content']`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who speaks: `system`, `user` or `assistant` (templates may accept others, e.g. `tool`).
    pub role: String,
    /// What is said.
    pub content: String,
}

impl Message {
    /// A message from `role` saying `content`.
    ///
    /// ```
    /// let m = lora_models::Message::new("user", "Hi");
    /// assert_eq!((m.role.as_str(), m.content.as_str()), ("user", "Hi"));
    /// ```
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Renders a chat template over `messages`, as transformers' `apply_chat_template(..., tokenize=False)`.
///
/// The template sees `messages`, `add_generation_prompt`, `bos_token` and `eos_token` (plus
/// `tools` and `documents`, both `none`). With `add_generation_prompt`, templates end the prompt with
/// the header of an assistant turn, so that the model's continuation is the answer.
///
/// ```
/// use lora_models::{render_chat, Message};
///
/// let template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}";
/// let text = render_chat(template, &[Message::new("user", "Hi")], false, "", "</s>")?;
/// assert_eq!(text, "user: Hi\n");
/// # Ok::<(), lora_models::ModelError>(())
/// ```
///
/// # Errors
///
/// [`ModelError::Template`] when the template does not compile, or when rendering fails, which
/// includes a template calling `raise_exception` (its message is kept), e.g. on a conversation whose
/// roles do not alternate.
pub fn render_chat(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, ModelError> {
    let env = environment();
    let compiled = env
        .template_from_named_str("chat_template", template)
        .map_err(|source| ModelError::Template {
            what: "compile the template",
            source,
        })?;
    compiled
        .render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
            tools => Value::from(()),
            documents => Value::from(()),
        })
        .map_err(|source| ModelError::Template {
            what: "render the messages",
            source,
        })
}

/// A Jinja environment configured like transformers' `_compile_jinja_template`.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env
}

/// `raise_exception(message)`: a template's way to refuse a conversation.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `x | tojson(indent=None, separators=None, sort_keys=False)`, as Python's
/// `json.dumps(x, ensure_ascii=False, ...)`: `", "` and `": "` between items unless indented, non-ASCII
/// kept, no HTML escaping (minijinja's own `tojson` escapes `<`, `>`, `&` and `'`).
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    if ensure_ascii == Some(true) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "tojson: `ensure_ascii=True` is not supported",
        ));
    }
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.kind() {
            ValueKind::Number => {
                let n = i64::try_from(v.clone())?;
                Some(" ".repeat(usize::try_from(n.max(0)).unwrap_or(0)))
            }
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: `indent` must be an int or a string",
                ))
            }
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: `separators` must be two strings",
                    )
                })?;
            match <[String; 2]>::try_from(parts) {
                Ok([item, key]) => (item, key),
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: `separators` must be two strings",
                    ))
                }
            }
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(value, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

/// The layout `json.dumps` is asked for.
struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl JsonStyle {
    fn write(&self, value: &Value, depth: usize, out: &mut String) -> Result<(), Error> {
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&python_number(value)),
            ValueKind::String | ValueKind::Bytes | ValueKind::Plain | ValueKind::Invalid => {
                let text = value
                    .as_str()
                    .map_or_else(|| value.to_string(), str::to_string);
                out.push_str(&json_string(&text));
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.write_container(out, depth, ('[', ']'), items.len(), |i, out| {
                    self.write(&items[i], depth + 1, out)
                })?;
            }
            ValueKind::Map => {
                let mut entries: Vec<(String, Value)> = Vec::new();
                for key in value.try_iter()? {
                    let item = value.get_item(&key)?;
                    entries.push((json_key(&key), item));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.write_container(out, depth, ('{', '}'), entries.len(), |i, out| {
                    let (key, item) = &entries[i];
                    out.push_str(&json_string(key));
                    out.push_str(&self.key_sep);
                    self.write(item, depth + 1, out)
                })?;
            }
            // `ValueKind` is non-exhaustive: anything new is written as its text.
            _ => out.push_str(&json_string(&value.to_string())),
        }
        Ok(())
    }

    fn write_container(
        &self,
        out: &mut String,
        depth: usize,
        (open, close): (char, char),
        len: usize,
        mut item: impl FnMut(usize, &mut String) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        if len == 0 {
            out.push(close);
            return Ok(());
        }
        for i in 0..len {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            if let Some(indent) = &self.indent {
                out.push('\n');
                out.push_str(&indent.repeat(depth + 1));
            }
            item(i, out)?;
        }
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth));
        }
        out.push(close);
        Ok(())
    }
}

/// A JSON string literal as Python writes it with `ensure_ascii=False` (serde_json escapes the same
/// characters: `"`, `\`, and control characters).
fn json_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| format!("\"{text}\""))
}

/// A map key as `json.dumps` turns it into a string.
fn json_key(key: &Value) -> String {
    match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
        ValueKind::None | ValueKind::Undefined => "null".to_string(),
        ValueKind::Number => python_number(key),
        _ => key.to_string(),
    }
}

/// A number as Python's `json.dumps` writes it: integers exactly, floats as `repr` does.
fn python_number(value: &Value) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    match f64::try_from(value.clone()) {
        Ok(float) => python_float(float),
        Err(_) => value.to_string(),
    }
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form below 1e-4 and from 1e16.
fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".to_string();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    let sci = format!("{x:e}"); // e.g. "1.5e-5", "1e16"
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if x != 0.0 && !(-4..16).contains(&exponent) {
        let sign = if exponent < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exponent.abs());
    }
    let plain = format!("{x}");
    if plain.contains('.') {
        plain
    } else {
        format!("{plain}.0")
    }
}

/// `strftime_now(format)`: the current time formatted with C's `strftime` directives (in UTC).
///
/// Supports `%Y %y %m %d %e %H %I %M %S %p %j %a %A %b %B %h %F %T %D %%`; Llama 3 templates use
/// `%d %b %Y`.
fn strftime_now(format: String) -> Result<String, Error> {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("strftime_now: {e}")))?
        .as_secs();
    strftime(&format, seconds)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Formats `unix_seconds` (UTC) with a `strftime` format.
fn strftime(format: &str, unix_seconds: u64) -> Result<String, Error> {
    let days = i64::try_from(unix_seconds / 86_400).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            "strftime_now: the clock is out of range",
        )
    })?;
    let secs_of_day = unix_seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    let weekday = usize::try_from((days + 3).rem_euclid(7)).unwrap_or(0); // 1970-01-01 was a Thursday
    let month_index = usize::try_from(month - 1).unwrap_or(0);
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(directive) = chars.next() else {
            out.push('%');
            break;
        };
        let piece = match directive {
            'Y' => year.to_string(),
            'y' => format!("{:02}", year.rem_euclid(100)),
            'm' => format!("{month:02}"),
            'd' => format!("{day:02}"),
            'e' => format!("{day:>2}"),
            'H' => format!("{hour:02}"),
            'I' => format!("{hour12:02}"),
            'M' => format!("{minute:02}"),
            'S' => format!("{second:02}"),
            'p' => (if hour < 12 { "AM" } else { "PM" }).to_string(),
            'j' => format!("{day_of_year:03}"),
            'a' => WEEKDAYS[weekday][..3].to_string(),
            'A' => WEEKDAYS[weekday].to_string(),
            'b' | 'h' => MONTHS[month_index][..3].to_string(),
            'B' => MONTHS[month_index].to_string(),
            'F' => format!("{year}-{month:02}-{day:02}"),
            'T' => format!("{hour:02}:{minute:02}:{second:02}"),
            'D' => format!("{month:02}/{day:02}/{:02}", year.rem_euclid(100)),
            '%' => "%".to_string(),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported directive `%{other}`"),
                ))
            }
        };
        out.push_str(&piece);
    }
    Ok(out)
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a civil date (the inverse of [`civil_from_days`]).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str, messages: &[Message]) -> Result<String, ModelError> {
        render_chat(template, messages, false, "<s>", "</s>")
    }

    #[test]
    fn blocks_are_trimmed_like_transformers() {
        let template = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}";
        let out = render(
            template,
            &[Message::new("user", "a"), Message::new("assistant", "b")],
        )
        .unwrap();
        assert_eq!(out, "U:a\n");
    }

    #[test]
    fn python_string_methods_work() {
        let template = "{{ messages[0].content.strip() }}|{{ messages[0].content.startswith(' x') }}|\
                        {{ messages[0].content.split('y') | length }}|{{ 'a-b'.replace('-', '+').upper() }}";
        let out = render(template, &[Message::new("user", " xyz ")]).unwrap();
        assert_eq!(out, "xyz|True|2|A+B"); // Jinja2 prints Python booleans
    }

    #[test]
    fn raise_exception_becomes_a_template_error_with_its_message() {
        let template = "{% if messages[0].role != 'system' %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}";
        let err = render(template, &[Message::new("user", "x")]).unwrap_err();
        assert!(matches!(
            err,
            ModelError::Template {
                what: "render the messages",
                ..
            }
        ));
        assert!(
            err.to_string()
                .contains("Conversation roles must alternate"),
            "{err}"
        );
    }

    #[test]
    fn a_syntax_error_names_the_compile_stage() {
        let err = render("{% for m in messages %}", &[]).unwrap_err();
        assert!(matches!(
            err,
            ModelError::Template {
                what: "compile the template",
                ..
            }
        ));
        assert!(
            err.to_string()
                .starts_with("chat template: cannot compile the template"),
            "{err}"
        );
    }

    #[test]
    fn special_tokens_generation_prompt_and_loop_controls_are_visible() {
        let template = "{{ bos_token }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}\
                        {{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}>{% endif %}\
                        {% if tools is not none %}tools{% endif %}";
        let messages = [Message::new("user", "a"), Message::new("user", "b")];
        let out = render_chat(template, &messages, true, "<s>", "</s>").unwrap();
        assert_eq!(out, "<s>a</s>>");
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        // Expected strings from Python 3.11: json.dumps(x, ensure_ascii=False, ...).
        let t =
            |template: &str| render(template, &[Message::new("user", "é <b> \"q\"\n")]).unwrap();
        assert_eq!(
            t("{{ messages[0] | tojson }}"),
            r#"{"role": "user", "content": "é <b> \"q\"\n"}"#
        );
        assert_eq!(
            t("{{ messages[0] | tojson(sort_keys=true) }}"),
            r#"{"content": "é <b> \"q\"\n", "role": "user"}"#
        );
        assert_eq!(
            t("{{ {'a': [1, 2.5, none, true], 'b': {}} | tojson(indent=2) }}"),
            "{\n  \"a\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"b\": {}\n}"
        );
        assert_eq!(t("{{ [1, 2] | tojson(separators=[',', ':']) }}"), "[1,2]");
        assert_eq!(
            t("{{ [1.0, 1e20, 0.0001, 0.00001] | tojson }}"),
            "[1.0, 1e+20, 0.0001, 1e-05]"
        );
    }

    #[test]
    fn strftime_formats_like_c() {
        // 2024-07-26 13:05:09 UTC, a Friday, day 208 of a leap year.
        assert_eq!(
            strftime("%d %b %Y", 1_722_085_509 - 86_400).unwrap(),
            "26 Jul 2024"
        );
        assert_eq!(
            strftime("%A %B %e %H:%M:%S %I%p %j %y %F %%", 1_721_999_109).unwrap(),
            "Friday July 26 13:05:09 01PM 208 24 2024-07-26 %"
        );
        assert_eq!(strftime("%Y-%m-%d", 0).unwrap(), "1970-01-01");
        assert!(strftime("%Q", 0).is_err());
        let today = render("{{ strftime_now('%Y') }}", &[]).unwrap();
        assert!(today.parse::<i32>().unwrap() >= 2024);
    }
}
