//! JSONL reading (with errors that name file and line) and the padded, masked batch layout.

mod common;

use repshield::model::load_model_path;
use repshield::train::data::{read_jsonl, Encoder, Example, Layout, MaskMode};
use std::io::Write;

fn write(dir: &tempfile::TempDir, name: &str, body: &str) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::File::create(&p)
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    p
}

#[test]
fn jsonl_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let ok = write(
        &dir,
        "ok.jsonl",
        "{\"prompt\":\"a\",\"response\":\"b\"}\n\n{\"prompt\":\"c\",\"response\":\"d\"}\n",
    );
    assert_eq!(read_jsonl(&ok, true).unwrap().len(), 2);
    let cases = [
        (
            "bad.jsonl",
            "{\"prompt\":\"a\",\"response\":\"b\"}\n{\"prompt\": oops}\n",
            "bad.jsonl:2: malformed JSON",
        ),
        (
            "noresp.jsonl",
            "{\"prompt\":\"a\"}\n",
            "noresp.jsonl:1: missing or empty \"response\"",
        ),
        (
            "noprompt.jsonl",
            "{\"response\":\"a\"}\n",
            "noprompt.jsonl:1: missing or empty \"prompt\"",
        ),
        (
            "type.jsonl",
            "{\"prompt\":3,\"response\":\"x\"}\n",
            "type.jsonl:1: field \"prompt\" must be a string",
        ),
        ("empty.jsonl", "\n", "empty.jsonl: no examples"),
    ];
    for (name, body, want) in cases {
        let p = write(&dir, name, body);
        let err = format!("{:#}", read_jsonl(&p, true).unwrap_err());
        assert!(err.contains(want), "{name}: {err}");
    }
    let missing = format!(
        "{:#}",
        read_jsonl(&dir.path().join("nope.jsonl"), true).unwrap_err()
    );
    assert!(missing.contains("nope.jsonl"), "{missing}");
    // Prompt-only sets are allowed when the caller says so.
    let p = write(&dir, "prompts.jsonl", "{\"prompt\":\"a\"}\n");
    assert_eq!(read_jsonl(&p, false).unwrap()[0].response, "");
}

#[test]
fn batch_layout_left_pads_prompts_and_right_pads_responses() {
    let m = load_model_path(&common::fixture("tiny-llama")).unwrap();
    let layout = Layout {
        max_prompt: 24,
        max_response: 8,
    };
    let enc = Encoder::new(&m.tokenizer, layout);
    let exs = vec![
        Example {
            prompt: "hi".into(),
            response: "hello there".into(),
        },
        Example {
            prompt: "a much longer prompt with many words in it to tokenise".into(),
            response: "ok".into(),
        },
    ];
    let tb = enc.batch(&exs).unwrap();
    assert_eq!((tb.batch, tb.seq), (2, 32));
    for (b, ex) in exs.iter().enumerate() {
        let (p, r) = enc.encode(ex).unwrap();
        let row = &tb.input_ids[b * 32..(b + 1) * 32];
        let am = &tb.attention_mask[b * 32..(b + 1) * 32];
        // Prompt flush against position 23, response starting at 24.
        assert_eq!(&row[24 - p.len()..24], &p[..]);
        assert_eq!(&row[24..24 + r.len()], &r[..]);
        assert!(am[..24 - p.len()].iter().all(|&x| x == 0.0));
        assert!(am[24 - p.len()..24 + r.len()].iter().all(|&x| x == 1.0));
        assert!(am[24 + r.len()..].iter().all(|&x| x == 0.0));
        assert_eq!(
            *r.last().unwrap(),
            m.tokenizer.token_to_id("<|im_end|>").unwrap()
        );
        assert_eq!(tb.last_prompt_index[b], 23);
        // Masks.
        let resp = tb.mask(MaskMode::ResponseAll);
        assert_eq!(
            resp[b * 32..(b + 1) * 32].iter().sum::<f64>(),
            r.len() as f64
        );
        let last = tb.mask(MaskMode::RequestLast);
        assert_eq!(last[b * 32 + 23], 1.0);
        assert_eq!(last[b * 32..(b + 1) * 32].iter().sum::<f64>(), 1.0);
        let req = tb.mask(MaskMode::RequestAll);
        assert_eq!(
            req[b * 32..(b + 1) * 32].iter().sum::<f64>(),
            p.len() as f64
        );
        let all = tb.mask(MaskMode::All);
        assert_eq!(
            all[b * 32..(b + 1) * 32].iter().sum::<f64>(),
            (p.len() + r.len()) as f64
        );
    }
    // The prompt ends with the assistant header so the response follows the template.
    let (p, _) = enc.encode(&exs[0]).unwrap();
    let text = m.tokenizer.decode(&p, false).unwrap();
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text:?}");
    // Over-long prompts keep their end (the generation prompt), responses their start.
    let tight = Encoder::new(
        &m.tokenizer,
        Layout {
            max_prompt: 6,
            max_response: 2,
        },
    );
    let (p, r) = tight.encode(&exs[1]).unwrap();
    assert_eq!(p.len(), 6);
    assert_eq!(
        m.tokenizer.decode(&p, false).unwrap().trim_end(),
        m.tokenizer
            .decode(
                &enc.encode(&exs[1]).unwrap().0[enc.encode(&exs[1]).unwrap().0.len() - 6..],
                false
            )
            .unwrap()
            .trim_end()
    );
    assert_eq!(r.len(), 2);
}
