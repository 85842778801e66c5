//! Chat-template rendering against transformers.
//!
//! tests/fixtures/templates/reference.json holds renderings made by transformers 5.23 / jinja2
//! 3.1.6 (`render_jinja_template`, the function behind `apply_chat_template(tokenize=False)`),
//! written by tests/fixtures/templates/make_reference.py from the .jinja files beside it:
//! SmolLM2 (ChatML), Qwen2.5 (ChatML with a default system prompt and tools), Llama 3.1 and 3.2
//! (`bos_token`, `| trim`, `date_string`, `strftime_now`, tools as indented JSON), Mistral v0.3
//! (`[INST]`, namespace, `raise_exception` on role alternation, `tojson`), a template with
//! transformers' `{% generation %}` tag, and small inline templates for the jinja2 behaviours
//! these lean on. Every case must render byte for byte the same here, or fail with the same
//! message where transformers raises.
//!
//! The tiny checkpoints in tests/fixtures are also run through `apply_chat_template` itself,
//! text and token ids.
//!
//! Known differences, left out of the reference on purpose (no known chat template hits them):
//! Python tuples (from `dict.items()`) print as `('a', 1)` in jinja2 and as `['a', 1]` here
//! (minijinja has no tuple type); the `~` operator formats `none`/`true` the minijinja way
//! (`none`, `true`) where `{{ }}`, `|string` and `|join` print `None`/`True` as Python does; and
//! minijinja string literals do not know Python's `\U0001F600` escape. `strftime_now` is pinned
//! to 26 Jul 2024 on both sides (see tokenizer.rs).

use minijinja::Value;
use repshield::model::tokenizer::{ChatTemplate, TEMPLATE_DATE};
use repshield::model::{ChatTokenizer, Message};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/templates")
}

struct Case {
    name: String,
    source: String,
    ctx: Value,
    expected: Result<String, String>,
}

fn load_cases() -> Vec<Case> {
    let text =
        std::fs::read_to_string(fixtures().join("reference.json")).expect("reading reference.json");
    // Parsed straight into minijinja values so that key order (which `tojson` shows) is kept.
    let root: Value = serde_json::from_str(&text).expect("reference.json is JSON");
    let cases = root.get_attr("cases").unwrap();
    let mut out = Vec::new();
    for c in cases.try_iter().unwrap() {
        let name = c.get_attr("name").unwrap().as_str().unwrap().to_string();
        let tmpl = c.get_attr("template").unwrap();
        let source = match tmpl.as_str() {
            Some(file) => std::fs::read_to_string(fixtures().join(file)).expect("template file"),
            None => tmpl
                .get_attr("inline")
                .unwrap()
                .as_str()
                .unwrap()
                .to_string(),
        };
        let mut ctx: Vec<(Value, Value)> = Vec::new();
        for section in ["tokens", "kwargs"] {
            let m = c.get_attr(section).unwrap();
            for k in m.try_iter().unwrap() {
                let v = m.get_item(&k).unwrap();
                ctx.push((k, v));
            }
        }
        for key in ["messages", "add_generation_prompt", "tools"] {
            ctx.push((Value::from(key), c.get_attr(key).unwrap()));
        }
        let output = c.get_attr("output").unwrap();
        let expected = if output.is_undefined() {
            Err(c.get_attr("error").unwrap().as_str().unwrap().to_string())
        } else {
            Ok(output.as_str().unwrap().to_string())
        };
        out.push(Case {
            name,
            source,
            ctx: Value::from_iter(ctx),
            expected,
        });
    }
    out
}

/// Shows where two renderings part, with some context.
fn first_difference(got: &str, want: &str) -> String {
    let at = got
        .chars()
        .zip(want.chars())
        .take_while(|(a, b)| a == b)
        .count();
    let ctx = |s: &str| {
        s.chars()
            .skip(at.saturating_sub(30))
            .take(70)
            .collect::<String>()
    };
    format!(
        "first difference at char {at}:\n   got: {:?}\n  want: {:?}",
        ctx(got),
        ctx(want)
    )
}

/// Renders every case whose name starts with `prefix`; returns how many ran.
fn check_family(prefix: &str) -> usize {
    let cases: Vec<Case> = load_cases()
        .into_iter()
        .filter(|c| c.name.starts_with(prefix))
        .collect();
    assert!(!cases.is_empty(), "no reference cases for {prefix}");
    let mut failures = Vec::new();
    for c in &cases {
        let got = ChatTemplate::new(&c.source).and_then(|t| t.render(c.ctx.clone()));
        match (&got, &c.expected) {
            (Ok(g), Ok(w)) if g == w => {}
            (Err(e), Err(w)) if format!("{e:#}").contains(w.as_str()) => {}
            (Ok(g), Ok(w)) => failures.push(format!("{}: {}", c.name, first_difference(g, w))),
            (Ok(g), Err(w)) => failures.push(format!(
                "{}: transformers raised {w:?}, we rendered {g:?}",
                c.name
            )),
            (Err(e), Ok(_)) => failures.push(format!(
                "{}: transformers rendered, we failed: {e:#}",
                c.name
            )),
            (Err(e), Err(w)) => failures.push(format!("{}: error {e:#} lacks {w:?}", c.name)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from transformers:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    cases.len()
}

#[test]
fn reference_covers_every_family_both_ways() {
    let cases = load_cases();
    for fam in [
        "smollm2 ",
        "qwen2.5 ",
        "llama3.1 ",
        "llama3.2 ",
        "mistral-v0.3 ",
    ] {
        for agp in ["agp=True", "agp=False"] {
            let n = cases
                .iter()
                .filter(|c| c.name.starts_with(fam) && c.name.ends_with(agp))
                .count();
            assert!(n >= 5, "{fam}{agp}: only {n} cases");
        }
    }
    assert!(
        cases.iter().filter(|c| c.expected.is_err()).count() >= 2,
        "error cases missing"
    );
    // The cases must not all render alike (a broken generator could write one string everywhere).
    let distinct: std::collections::BTreeSet<_> = cases
        .iter()
        .filter_map(|c| c.expected.as_ref().ok())
        .collect();
    assert!(distinct.len() > cases.len() / 2);
}

#[test]
fn smollm2_chatml_matches_transformers() {
    assert!(check_family("smollm2 ") >= 12);
}

#[test]
fn qwen25_matches_transformers() {
    assert!(check_family("qwen2.5 ") >= 12);
}

#[test]
fn llama31_matches_transformers() {
    assert!(check_family("llama3.1 ") >= 15);
}

#[test]
fn llama32_strftime_now_matches_transformers() {
    assert!(check_family("llama3.2 ") >= 13);
}

#[test]
fn mistral_v03_matches_transformers() {
    assert!(check_family("mistral-v0.3 ") >= 12);
}

#[test]
fn generation_tags_render_their_body() {
    assert_eq!(check_family("generation tags"), 2);
}

#[test]
fn jinja2_behaviours_match_transformers() {
    assert!(check_family("inline: ") >= 20);
}

#[test]
fn strftime_now_is_pinned_to_template_date() {
    assert_eq!(TEMPLATE_DATE, (2024, 7, 26));
    let t = ChatTemplate::new("{{ strftime_now('%d %b %Y') }}").unwrap();
    assert_eq!(t.render(Value::UNDEFINED).unwrap(), "26 Jul 2024");
}

fn word_level_tokenizer(words: &[&str]) -> tokenizers::Tokenizer {
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), serde_json::json!(i)))
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&json).unwrap()).unwrap()
}

/// The convenience path (typed messages, special tokens from the tokenizer) renders what
/// transformers does for the same conversation.
#[test]
fn chat_tokenizer_render_chat_matches_reference() {
    let cases = load_cases();
    let want = |name: &str| {
        cases
            .iter()
            .find(|c| c.name == name)
            .unwrap()
            .expected
            .clone()
            .unwrap()
    };
    let msgs = [
        Message::new("system", "You are a careful assistant.\n"),
        Message::new("user", "Hello! How are you?"),
        Message::new("assistant", "  I'm fine, thanks.\n\n"),
        Message::new("user", "Write a haiku about the sea."),
    ];
    let tok = |tmpl: &str, bos: Option<&str>, eos: Option<&str>| {
        ChatTokenizer::new(
            word_level_tokenizer(&["<unk>", "hello"]),
            Some(std::fs::read_to_string(fixtures().join(tmpl)).unwrap()),
            bos.map(str::to_string),
            eos.map(str::to_string),
        )
    };
    let llama = tok(
        "llama3.1.jinja",
        Some("<|begin_of_text|>"),
        Some("<|eot_id|>"),
    );
    assert_eq!(
        llama.render_chat(&msgs, true).unwrap(),
        want("llama3.1 with system agp=True")
    );
    assert_eq!(
        llama.render_chat(&msgs, false).unwrap(),
        want("llama3.1 with system agp=False")
    );
    let mistral = tok("mistral-v0.3.jinja", Some("<s>"), Some("</s>"));
    assert_eq!(
        mistral.render_chat(&msgs, true).unwrap(),
        want("mistral-v0.3 with system agp=True")
    );
    let qwen = tok("qwen2.5.jinja", None, Some("<|im_end|>"));
    assert_eq!(
        qwen.render_chat(&msgs[1..], true).unwrap(),
        want("qwen2.5 conversation agp=True")
    );
    let smol = tok("smollm2.jinja", Some("<|im_start|>"), Some("<|im_end|>"));
    assert_eq!(
        smol.render_chat(&msgs[1..], false).unwrap(),
        want("smollm2 conversation agp=False")
    );

    // Extra variables reach the template (date_string overrides the pinned date).
    let extra = Value::from_iter([("date_string", Value::from("01 Jan 2025"))]);
    let dated = llama
        .render_chat_with(Value::from_serialize(&msgs), true, extra)
        .unwrap();
    assert_eq!(dated, want("llama3.1 date_string given"));

    // Role alternation errors surface with the template's own message.
    let bad = [Message::new("user", "a"), Message::new("user", "b")];
    let err = mistral.render_chat(&bad, true).unwrap_err();
    assert!(
        format!("{err:#}").contains("conversation roles must alternate"),
        "{err:#}"
    );

    // Editing the template source is picked up (the compiled template is cached by source).
    let mut smol = smol;
    smol.chat_template = Some("{{ messages[0].content }}!".into());
    assert_eq!(
        smol.render_chat(&msgs, false).unwrap(),
        "You are a careful assistant.\n!"
    );
}

#[test]
fn template_errors_are_reported_not_panics() {
    let err = ChatTemplate::new("{% for m in messages %}{{ m.content }")
        .err()
        .expect("syntax error");
    assert!(
        format!("{err:#}").contains("parsing the chat template"),
        "{err:#}"
    );
    let no_template = ChatTokenizer::new(word_level_tokenizer(&["<unk>"]), None, None, None);
    let err = no_template
        .render_chat(&[Message::new("user", "x")], true)
        .unwrap_err();
    assert!(format!("{err:#}").contains("no chat template"), "{err:#}");
}

/// transformers' `apply_chat_template` on the tiny checkpoints in tests/fixtures (byte-level BPE
/// tokenizer, ChatML template from tokenizer_config.json): the same text and the same token ids.
#[test]
fn tiny_llama_fixture_chat_text_and_ids_match_transformers() {
    let text = std::fs::read_to_string(fixtures().join("reference.json")).unwrap();
    let root: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = root["fixtures"]
        .as_array()
        .expect("reference.json has fixture cases");
    assert!(cases.len() >= 8, "only {} fixture cases", cases.len());
    let mut loaded = std::collections::HashMap::new();
    for c in cases {
        let fixture = c["fixture"].as_str().unwrap();
        let m = loaded.entry(fixture.to_string()).or_insert_with(|| {
            let dir = fixtures().join("..").join(fixture);
            repshield::model::hf::load_hf_dir(&dir).unwrap_or_else(|e| panic!("{fixture}: {e:#}"))
        });
        let msgs: Vec<Message> = c["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let agp = c["add_generation_prompt"].as_bool().unwrap();
        let name = format!("{fixture} {}", c["name"].as_str().unwrap());
        assert_eq!(
            m.tokenizer.render_chat(&msgs, agp).unwrap(),
            c["output"].as_str().unwrap(),
            "{name}"
        );
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(m.tokenizer.encode_chat(&msgs, agp).unwrap(), want, "{name}");
    }
}
