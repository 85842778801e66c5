//! Tokenizer (Hugging Face `tokenizers`) plus the model's Jinja chat template (minijinja).
//!
//! Chat templates are small programs written for Python's jinja2 as transformers configures it
//! (`transformers.utils.chat_template_utils._compile_jinja_template`): a sandboxed environment
//! with `trim_blocks=True`, `lstrip_blocks=True`, the loop-controls extension, its own `tojson`
//! (`json.dumps` with `ensure_ascii=False`), `raise_exception`, `strftime_now`, and a
//! `{% generation %}` tag for assistant masks. [`ChatTemplate`] sets minijinja up the same way
//! and papers over the places where minijinja's Rust-flavoured behaviour shows through: values
//! print as Python prints them (`None`, `True`, `['a', 1]`), `trim`/`strip()` use Python's
//! whitespace set, and the Python `str`/`dict` methods templates call are provided.
//!
//! One deliberate difference: transformers' `strftime_now` formats the wall clock
//! (`datetime.now()`), so Llama 3.2's template prints today's date and the same conversation
//! tokenizes differently from one day to the next. Here `strftime_now` formats the fixed date
//! [`TEMPLATE_DATE`] (26 Jul 2024, the date Llama 3.1's template hard-codes and Llama 3.2's
//! falls back to), keeping training data, attacks and evaluations reproducible. Pass
//! `date_string` in the extra context to choose another date for Llama templates.

use anyhow::{anyhow, Context, Result};
use minijinja::value::{from_args, Kwargs, Rest, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// The date `strftime_now` formats (year, month, day), at midnight. See the module docs.
pub const TEMPLATE_DATE: (i32, u32, u32) = (2024, 7, 26);

pub struct ChatTokenizer {
    pub inner: tokenizers::Tokenizer,
    /// Jinja source of the chat template, as in `tokenizer_config.json` / GGUF `tokenizer.chat_template`.
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Compiled template, keyed by its source so edits to `chat_template` are picked up.
    compiled: Mutex<Option<(String, Arc<ChatTemplate>)>>,
}

impl ChatTokenizer {
    pub fn new(
        inner: tokenizers::Tokenizer,
        chat_template: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Self {
        Self {
            inner,
            chat_template,
            bos_token,
            eos_token,
            compiled: Mutex::new(None),
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, tok: &str) -> Option<u32> {
        self.inner.token_to_id(tok)
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("tokenizing failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("detokenizing failed: {e}"))
    }

    /// The compiled chat template (compiled once, then cached).
    pub fn template(&self) -> Result<Arc<ChatTemplate>> {
        let src = self.chat_template.as_deref().context(
            "this model has no chat template (tokenizer_config.json chat_template / GGUF tokenizer.chat_template)",
        )?;
        let mut cache = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cached_src, t)) = cache.as_ref() {
            if cached_src == src {
                return Ok(t.clone());
            }
        }
        let t = Arc::new(ChatTemplate::new(src)?);
        *cache = Some((src.to_string(), t.clone()));
        Ok(t)
    }

    /// Renders messages with the model's chat template, exactly as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` does.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_chat_with(
            Value::from_serialize(messages),
            add_generation_prompt,
            Value::UNDEFINED,
        )
    }

    /// Renders arbitrary messages (tool calls, extra fields) with extra template variables, like
    /// `apply_chat_template(messages, tools=..., **extra)`. `extra` is a map (or undefined) and may
    /// hold `tools`, `documents`, `date_string`, `enable_thinking`, ...; it overrides the
    /// tokenizer's special tokens, as keyword arguments do in transformers.
    pub fn render_chat_with(
        &self,
        messages: Value,
        add_generation_prompt: bool,
        extra: Value,
    ) -> Result<String> {
        let mut ctx: Vec<(String, Value)> = Vec::new();
        if let Some(b) = &self.bos_token {
            ctx.push(("bos_token".into(), Value::from(b.as_str())));
        }
        if let Some(e) = &self.eos_token {
            ctx.push(("eos_token".into(), Value::from(e.as_str())));
        }
        if !extra.is_undefined() && !extra.is_none() {
            if extra.kind() != ValueKind::Map {
                anyhow::bail!(
                    "extra chat-template variables must be a map, got {}",
                    extra.kind()
                );
            }
            for k in extra.try_iter()? {
                let v = extra.get_item(&k)?;
                let k = k
                    .as_str()
                    .context("extra chat-template variable names must be strings")?
                    .to_string();
                ctx.retain(|(n, _)| *n != k);
                ctx.push((k, v));
            }
        }
        ctx.push(("messages".into(), messages));
        ctx.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        self.template()?.render(Value::from_iter(ctx))
    }

    /// Template + tokenize: the ids a chat model sees for `messages`.
    pub fn encode_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = self.render_chat(messages, add_generation_prompt)?;
        // Templates already contain BOS where the model wants one.
        self.encode(&text, false)
    }
}

/// A chat template compiled in an environment configured like transformers' jinja2 one.
pub struct ChatTemplate {
    env: Environment<'static>,
}

const TEMPLATE_NAME: &str = "chat_template";

impl ChatTemplate {
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(python_method);
        env.set_formatter(|out, _state, value| {
            let mut s = String::new();
            py_str(value, &mut s);
            out.write_str(&s).map_err(Error::from)
        });
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> Value {
            strftime_fixed(&fmt).into()
        });
        env.add_filter("tojson", tojson_filter);
        env.add_filter("string", |v: Value| -> Value {
            let mut s = String::new();
            py_str(&v, &mut s);
            s.into()
        });
        env.add_filter("trim", |s: String, chars: Option<String>| -> Value {
            match chars {
                Some(c) => s.trim_matches(|ch| c.contains(ch)).into(),
                None => s.trim_matches(py_is_space).into(),
            }
        });
        env.add_filter("join", join_filter);
        env.add_test("iterable", |v: Value| {
            matches!(
                v.kind(),
                ValueKind::Undefined
                    | ValueKind::String
                    | ValueKind::Seq
                    | ValueKind::Map
                    | ValueKind::Iterable
            )
        });
        env.add_test("sequence", |v: Value| {
            matches!(
                v.kind(),
                ValueKind::String | ValueKind::Seq | ValueKind::Map
            )
        });
        env.add_test("number", |v: Value| {
            matches!(v.kind(), ValueKind::Number | ValueKind::Bool)
        });
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(source))
            .map_err(|e| anyhow!("parsing the chat template: {e}"))?;
        Ok(Self { env })
    }

    /// Renders with `ctx` (a map). transformers always passes `tools` and `documents` (None when
    /// unused), which templates test with `is not none`: they are filled in when absent.
    pub fn render(&self, ctx: Value) -> Result<String> {
        let mut entries: Vec<(Value, Value)> = Vec::new();
        if !ctx.is_undefined() {
            for k in ctx
                .try_iter()
                .map_err(|e| anyhow!("chat template context must be a map: {e}"))?
            {
                let v = ctx.get_item(&k).unwrap_or_default();
                entries.push((k, v));
            }
        }
        for key in ["tools", "documents"] {
            if !entries.iter().any(|(k, _)| k.as_str() == Some(key)) {
                entries.push((Value::from(key), Value::from(())));
            }
        }
        let tmpl = self.env.get_template(TEMPLATE_NAME)?;
        tmpl.render(Value::from_iter(entries)).map_err(|e| {
            let mut msg = format!(
                "rendering the chat template: {}",
                e.detail().unwrap_or("error")
            );
            if let Some(line) = e.line() {
                let _ = write!(msg, " (template line {line})");
            }
            if e.kind() != ErrorKind::InvalidOperation {
                let _ = write!(msg, " [{e}]");
            }
            anyhow!(msg)
        })
    }
}

/// transformers' `{% generation %} ... {% endgeneration %}` marks assistant text for masks and
/// otherwise renders its body unchanged; minijinja has no such tag, so it becomes an
/// always-true `if` with the same whitespace-control markers.
fn rewrite_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(i) = rest.find("{%") {
        out.push_str(&rest[..i]);
        let tag = &rest[i..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (lead, body) = match inner.chars().next() {
            Some(c @ ('-' | '+')) => (Some(c), &inner[1..]),
            _ => (None, inner),
        };
        let (body, trail) = match body.chars().last() {
            Some(c @ ('-' | '+')) => (&body[..body.len() - 1], Some(c)),
            _ => (body, None),
        };
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                out.push_str("{%");
                out.extend(lead);
                out.push(' ');
                out.push_str(r);
                out.push(' ');
                out.extend(trail);
                out.push_str("%}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Python's `str.isspace()` set: Unicode White_Space plus the ASCII separators 0x1c..0x1f.
fn py_is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form outside [1e-4, 1e16).
fn py_float(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    let sci = format!("{:e}", x.abs());
    let (mant, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let sign = if x < 0.0 { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let s = if exp < 0 {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        } else {
            let point = exp as usize + 1;
            if digits.len() <= point {
                format!("{}{}.0", digits, "0".repeat(point - digits.len()))
            } else {
                format!("{}.{}", &digits[..point], &digits[point..])
            }
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{esign}{:02}", exp.abs())
    }
}

fn py_str_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..0xa0).contains(&(c as u32)) => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `str(x)` for a template value: what `{{ x }}` and `|string` print in jinja2.
fn py_str(v: &Value, out: &mut String) {
    match v.kind() {
        ValueKind::Undefined => {}
        ValueKind::String => out.push_str(v.as_str().unwrap_or_default()),
        _ => py_repr(v, out),
    }
}

/// Python's `repr(x)`: how values print inside lists and dicts.
fn py_repr(v: &Value, out: &mut String) {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number => {
            if v.is_integer() {
                let _ = write!(out, "{v}");
            } else {
                out.push_str(&py_float(f64::try_from(v.clone()).unwrap_or(f64::NAN)));
            }
        }
        ValueKind::String => py_str_repr(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq => {
            out.push('[');
            for (i, item) in v.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&item, out);
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, k) in v.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&k, out);
                out.push_str(": ");
                py_repr(&v.get_item(&k).unwrap_or_default(), out);
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{v}");
        }
    }
}

/// jinja2's `join(d='', attribute=None)`, printing items as Python does.
fn join_filter(value: Value, rest: Rest<Value>) -> Result<Value, Error> {
    let (args, kwargs): (&[Value], Kwargs) = from_args(&rest)?;
    let sep = match args.first() {
        Some(s) => s.as_str().unwrap_or_default().to_string(),
        None => kwargs.get::<Option<String>>("d")?.unwrap_or_default(),
    };
    let attribute: Option<Value> = kwargs.get("attribute")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    for (i, item) in value.try_iter()?.enumerate() {
        if i > 0 {
            out.push_str(&sep);
        }
        let item = match &attribute {
            Some(a) => item.get_item(a)?,
            None => item,
        };
        py_str(&item, &mut out);
    }
    Ok(out.into())
}

/// Options of Python's `json.dumps` that transformers' `tojson` exposes.
struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`,
/// i.e. `json.dumps` with those arguments: `", "`/`": "` separators, no HTML escaping, non-ASCII
/// kept as is, keys in insertion order.
fn tojson_filter(value: &Value, rest: Rest<Value>) -> Result<Value, Error> {
    let (args, kwargs): (&[Value], Kwargs) = from_args(&rest)?;
    let names = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.len() > names.len() {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments",
        ));
    }
    let mut opt: [Option<Value>; 4] = Default::default();
    for (i, a) in args.iter().enumerate() {
        opt[i] = Some(a.clone());
    }
    for (i, n) in names.iter().enumerate() {
        if let Some(v) = kwargs.get::<Option<Value>>(n)? {
            opt[i] = Some(v);
        }
    }
    kwargs.assert_all_used()?;
    fn set(v: &Option<Value>) -> Option<&Value> {
        v.as_ref().filter(|v| !v.is_none() && !v.is_undefined())
    }
    let indent = match set(&opt[1]) {
        None => None,
        Some(v) if v.kind() == ValueKind::String => {
            Some(v.as_str().unwrap_or_default().to_string())
        }
        Some(v) => {
            let n = i64::try_from(v.clone()).map_err(|_| {
                Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                )
            })?;
            Some(" ".repeat(n.max(0) as usize))
        }
    };
    let (item_sep, key_sep) = match set(&opt[2]) {
        Some(seps) => {
            let parts: Vec<String> = seps
                .try_iter()?
                .map(|s| s.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .filter(|p: &Vec<String>| p.len() == 2)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be (item_sep, key_sep)",
                    )
                })?;
            (parts[0].clone(), parts[1].clone())
        }
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let opts = JsonOpts {
        ensure_ascii: set(&opt[0]).is_some_and(|v| v.is_true()),
        indent,
        item_sep,
        key_sep,
        sort_keys: set(&opt[3]).is_some_and(|v| v.is_true()),
    };
    let mut out = String::new();
    json_dump(value, &opts, 0, &mut out)?;
    Ok(out.into())
}

fn json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A dict key as `json.dumps` writes it: strings as they are, scalars converted.
fn json_key(k: &Value) -> Result<String, Error> {
    Ok(match k.kind() {
        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
        ValueKind::None => "null".into(),
        ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).into(),
        ValueKind::Number => {
            let mut s = String::new();
            py_repr(k, &mut s);
            s
        }
        other => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: keys must be str, not {other}"),
            ))
        }
    })
}

fn json_newline(opts: &JsonOpts, level: usize, out: &mut String) {
    if let Some(ind) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

fn json_dump(v: &Value, opts: &JsonOpts, level: usize, out: &mut String) -> Result<(), Error> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                let _ = write!(out, "{v}");
            } else {
                let x = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                out.push_str(&match x {
                    x if x.is_nan() => "NaN".to_string(),
                    x if x == f64::INFINITY => "Infinity".to_string(),
                    x if x == f64::NEG_INFINITY => "-Infinity".to_string(),
                    x => py_float(x),
                });
            }
        }
        ValueKind::String => json_str(v.as_str().unwrap_or_default(), opts.ensure_ascii, out),
        ValueKind::Map => {
            let mut items: Vec<(String, Value)> = Vec::new();
            for k in v.try_iter()? {
                items.push((json_key(&k)?, v.get_item(&k)?));
            }
            if opts.sort_keys {
                items.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if items.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (k, item)) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                json_newline(opts, level + 1, out);
                json_str(k, opts.ensure_ascii, out);
                out.push_str(&opts.key_sep);
                json_dump(item, opts, level + 1, out)?;
            }
            json_newline(opts, level, out);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                json_newline(opts, level + 1, out);
                json_dump(item, opts, level + 1, out)?;
            }
            json_newline(opts, level, out);
            out.push(']');
        }
        other => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: object of type {other} is not JSON serializable"),
            ))
        }
    }
    Ok(())
}

/// `strftime` of [`TEMPLATE_DATE`] at 00:00:00 (a Friday), for the codes templates use.
fn strftime_fixed(fmt: &str) -> String {
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
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
    let (y, m, d) = TEMPLATE_DATE;
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let yday: u32 = month_days[..(m - 1) as usize].iter().sum::<u32>() + d;
    // Days since 1970-01-01 (a Thursday) give the weekday.
    let days_before_year: i64 = (1970..y as i64)
        .map(|yy| {
            if (yy % 4 == 0 && yy % 100 != 0) || yy % 400 == 0 {
                366
            } else {
                365
            }
        })
        .sum();
    let wday = ((days_before_year + yday as i64 - 1 + 3) % 7) as usize; // 0 = Monday
    let (month, day) = (MONTHS[(m - 1) as usize], DAYS[wday]);
    let mut out = String::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        // glibc's "%-d" (no padding), which Python passes through on Linux.
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let num = |n: u32, w: usize| {
            if unpadded {
                n.to_string()
            } else {
                format!("{n:0w$}")
            }
        };
        match chars.next() {
            Some('a') => out.push_str(&day[..3]),
            Some('A') => out.push_str(day),
            Some('b') | Some('h') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('d') => out.push_str(&num(d, 2)),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('m') => out.push_str(&num(m, 2)),
            Some('y') => out.push_str(&num((y % 100) as u32, 2)),
            Some('Y') => out.push_str(&y.to_string()),
            Some('H') | Some('M') | Some('S') => out.push_str(&num(0, 2)),
            Some('I') => out.push_str("12"),
            Some('p') => out.push_str("AM"),
            Some('j') => out.push_str(&num(yday, 3)),
            Some('f') => out.push_str("000000"),
            Some('F') => out.push_str(&format!("{y:04}-{m:02}-{d:02}")),
            Some('D') | Some('x') => out.push_str(&format!("{m:02}/{d:02}/{:02}", y % 100)),
            Some('T') | Some('X') => out.push_str("00:00:00"),
            Some('c') => out.push_str(&format!("{} {} {d:2} 00:00:00 {y}", &day[..3], &month[..3])),
            Some('u') => out.push_str(&(wday + 1).to_string()),
            Some('w') => out.push_str(&((wday + 1) % 7).to_string()),
            Some('z') | Some('Z') => {}
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// The Python `str`, `dict` and `list` methods that chat templates call (`.strip()`,
/// `.startswith()`, `.split()`, `.items()`, `.get()`, ...), with Python's semantics.
fn python_method(
    _state: &minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    let unknown = || {
        Error::new(
            ErrorKind::UnknownMethod,
            format!("{} has no method named {method}", value.kind()),
        )
    };
    let str_arg = |i: usize| -> Result<Option<String>, Error> {
        match args.get(i) {
            None => Ok(None),
            Some(a) if a.is_none() => Ok(None),
            Some(a) => a.as_str().map(|s| Some(s.to_string())).ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidOperation,
                    format!("{method}() expects a string argument"),
                )
            }),
        }
    };
    let int_arg = |i: usize, default: i64| -> Result<i64, Error> {
        match args.get(i) {
            None => Ok(default),
            Some(a) if a.is_none() => Ok(default),
            Some(a) => i64::try_from(a.clone()),
        }
    };
    match value.kind() {
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            Ok(match method {
                "strip" | "lstrip" | "rstrip" => {
                    let set = str_arg(0)?;
                    let is_strip = |c: char| match &set {
                        Some(set) => set.contains(c),
                        None => py_is_space(c),
                    };
                    match method {
                        "strip" => s.trim_matches(is_strip),
                        "lstrip" => s.trim_start_matches(is_strip),
                        _ => s.trim_end_matches(is_strip),
                    }
                    .into()
                }
                "startswith" | "endswith" => {
                    let prefixes: Vec<String> = match args.first() {
                        Some(a) if matches!(a.kind(), ValueKind::Seq) => a
                            .try_iter()?
                            .filter_map(|p| p.as_str().map(str::to_string))
                            .collect(),
                        _ => vec![str_arg(0)?.unwrap_or_default()],
                    };
                    let hit = prefixes.iter().any(|p| {
                        if method == "startswith" {
                            s.starts_with(p.as_str())
                        } else {
                            s.ends_with(p.as_str())
                        }
                    });
                    hit.into()
                }
                "upper" => s.to_uppercase().into(),
                "lower" => s.to_lowercase().into(),
                "capitalize" => {
                    let mut cs = s.chars();
                    match cs.next() {
                        Some(f) => f
                            .to_uppercase()
                            .chain(cs.flat_map(char::to_lowercase))
                            .collect::<String>()
                            .into(),
                        None => "".into(),
                    }
                }
                "title" => {
                    let mut out = String::new();
                    let mut prev_cased = false;
                    for ch in s.chars() {
                        if prev_cased {
                            out.extend(ch.to_lowercase())
                        } else {
                            out.extend(ch.to_uppercase())
                        }
                        prev_cased = ch.is_lowercase() || ch.is_uppercase();
                    }
                    out.into()
                }
                "split" | "rsplit" => {
                    let maxsplit = int_arg(1, -1)?;
                    let parts: Vec<Value> = match str_arg(0)? {
                        Some(sep) if sep.is_empty() => {
                            return Err(Error::new(ErrorKind::InvalidOperation, "empty separator"))
                        }
                        Some(sep) => {
                            let v: Vec<&str> = match (maxsplit < 0, method == "split") {
                                (true, _) => s.split(sep.as_str()).collect(),
                                (false, true) => {
                                    s.splitn(maxsplit as usize + 1, sep.as_str()).collect()
                                }
                                (false, false) => {
                                    let mut v: Vec<&str> =
                                        s.rsplitn(maxsplit as usize + 1, sep.as_str()).collect();
                                    v.reverse();
                                    v
                                }
                            };
                            v.into_iter().map(Value::from).collect()
                        }
                        None => split_whitespace(s, maxsplit, method == "rsplit")
                            .into_iter()
                            .map(Value::from)
                            .collect(),
                    };
                    parts.into()
                }
                "splitlines" => s.lines().map(Value::from).collect::<Vec<_>>().into(),
                "replace" => {
                    let (from, to) = (
                        str_arg(0)?.unwrap_or_default(),
                        str_arg(1)?.unwrap_or_default(),
                    );
                    let count = int_arg(2, -1)?;
                    if count < 0 {
                        s.replace(&from, &to).into()
                    } else {
                        s.replacen(&from, &to, count as usize).into()
                    }
                }
                "find" | "rfind" | "index" | "rindex" => {
                    let needle = str_arg(0)?.unwrap_or_default();
                    let pos = if method.starts_with('r') {
                        s.rfind(&needle)
                    } else {
                        s.find(&needle)
                    };
                    match pos {
                        Some(byte) => (s[..byte].chars().count() as i64).into(),
                        None if method.ends_with("find") => (-1i64).into(),
                        None => {
                            return Err(Error::new(
                                ErrorKind::InvalidOperation,
                                "substring not found",
                            ))
                        }
                    }
                }
                "count" => {
                    let needle = str_arg(0)?.unwrap_or_default();
                    if needle.is_empty() {
                        (s.chars().count() as i64 + 1).into()
                    } else {
                        (s.matches(needle.as_str()).count() as i64).into()
                    }
                }
                "join" => {
                    let mut out = String::new();
                    for (i, item) in args.first().ok_or_else(unknown)?.try_iter()?.enumerate() {
                        if i > 0 {
                            out.push_str(s);
                        }
                        out.push_str(item.as_str().ok_or_else(|| {
                            Error::new(
                                ErrorKind::InvalidOperation,
                                "join() expects a sequence of strings",
                            )
                        })?);
                    }
                    out.into()
                }
                "isdigit" => (!s.is_empty() && s.chars().all(|c| c.is_ascii_digit())).into(),
                "isalpha" => (!s.is_empty() && s.chars().all(char::is_alphabetic)).into(),
                "isalnum" => (!s.is_empty() && s.chars().all(char::is_alphanumeric)).into(),
                "isspace" => (!s.is_empty() && s.chars().all(py_is_space)).into(),
                "islower" => {
                    (s.chars().any(char::is_lowercase) && !s.chars().any(char::is_uppercase)).into()
                }
                "isupper" => {
                    (s.chars().any(char::is_uppercase) && !s.chars().any(char::is_lowercase)).into()
                }
                _ => return Err(unknown()),
            })
        }
        ValueKind::Map => match method {
            "items" => {
                let mut items = Vec::new();
                for k in value.try_iter()? {
                    let v = value.get_item(&k)?;
                    items.push(Value::from(vec![k, v]));
                }
                Ok(items.into())
            }
            "keys" => Ok(value.try_iter()?.collect::<Vec<_>>().into()),
            "values" => {
                let mut vals = Vec::new();
                for k in value.try_iter()? {
                    vals.push(value.get_item(&k)?);
                }
                Ok(vals.into())
            }
            "get" => {
                let key = args.first().cloned().unwrap_or_default();
                let v = value.get_item(&key)?;
                Ok(if v.is_undefined() {
                    args.get(1).cloned().unwrap_or(Value::from(()))
                } else {
                    v
                })
            }
            _ => Err(unknown()),
        },
        ValueKind::Seq => match method {
            "count" => {
                let needle = args.first().cloned().unwrap_or_default();
                Ok((value.try_iter()?.filter(|x| *x == needle).count() as i64).into())
            }
            "index" => {
                let needle = args.first().cloned().unwrap_or_default();
                value
                    .try_iter()?
                    .position(|x| x == needle)
                    .map(|i| Value::from(i as i64))
                    .ok_or_else(|| Error::new(ErrorKind::InvalidOperation, "value is not in list"))
            }
            _ => Err(unknown()),
        },
        _ => Err(unknown()),
    }
}

/// Python's `str.split()` / `str.rsplit()` without a separator: runs of whitespace separate,
/// leading and trailing whitespace yields no empty strings, `maxsplit` bounds the splits.
fn split_whitespace(s: &str, maxsplit: i64, from_right: bool) -> Vec<String> {
    if maxsplit < 0 {
        return s
            .split(py_is_space)
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
    }
    let chars: Vec<char> = if from_right {
        s.chars().rev().collect()
    } else {
        s.chars().collect()
    };
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        while i < chars.len() && py_is_space(chars[i]) {
            i += 1;
        }
        if i == chars.len() {
            break;
        }
        if parts.len() as i64 == maxsplit {
            // The remainder keeps its inner and far-end whitespace, as in Python.
            parts.push(chars[i..].iter().collect());
            break;
        }
        let start = i;
        while i < chars.len() && !py_is_space(chars[i]) {
            i += 1;
        }
        parts.push(chars[start..i].iter().collect());
    }
    if from_right {
        parts
            .iter_mut()
            .for_each(|p| *p = p.chars().rev().collect());
        parts.reverse();
    }
    parts
}
