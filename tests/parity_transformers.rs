//! Parity with Hugging Face transformers (fixtures written by tools/make_fixtures.py):
//! tiny random Llama models (every hidden state and the logits) and SmolLM2 from its GGUF
//! (top-10 logits and 32 greedy tokens).

mod common;

use common::{fixture, max_rel, smollm2};
use repshield::backend::cpu::CpuBackend;
use repshield::backend::Backend;
use repshield::llama::{generate, GenerateOptions, Llama, LogitsMode, Sampling};
use repshield::model::{load_model_path, Message};
use safetensors::SafeTensors;

fn tensor_f32(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("fixture tensor {name} missing"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn tensor_ids(st: &SafeTensors, name: &str) -> Vec<u32> {
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("fixture tensor {name} missing"));
    assert_eq!(t.dtype(), safetensors::Dtype::I64, "{name}");
    t.data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect()
}

fn check_tiny(dir: &str) {
    let m = load_model_path(&fixture(dir)).unwrap();
    let llama = Llama::new(CpuBackend, &m.config, &m.weights).unwrap();
    let bytes = std::fs::read(fixture(&format!("{dir}/expected.safetensors"))).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let layers = m.config.num_layers;
    for p in 0..2 {
        let ids = tensor_ids(&st, &format!("p{p}.input_ids"));
        let mut cache = llama.new_cache(1, ids.len()).unwrap();
        let all: Vec<usize> = (0..=layers).collect();
        let out = llama
            .forward(&ids, 1, &mut cache, None, &all, LogitsMode::All)
            .unwrap();
        let logits = CpuBackend.download(out.logits.as_ref().unwrap()).unwrap();
        let want = tensor_f32(&st, &format!("p{p}.logits"));
        let e = max_rel(&logits, &want);
        assert!(
            e < 1e-4,
            "{dir} prompt {p}: logits max|diff|/max|ref| = {e}"
        );
        for (i, h) in &out.hidden {
            let want = tensor_f32(&st, &format!("p{p}.hidden.{i}"));
            let e = max_rel(h, &want);
            assert!(e < 1e-4, "{dir} prompt {p}: hidden state {i}: {e}");
        }
        assert_eq!(out.hidden.len(), layers + 1);
    }
}

#[test]
fn tiny_llama_untied_matches_transformers() {
    check_tiny("tiny-llama");
}

#[test]
fn tiny_llama_tied_bf16_llama3_rope_matches_transformers() {
    check_tiny("tiny-llama-tied");
}

#[test]
fn smollm2_matches_transformers() {
    let path = smollm2();
    let m = load_model_path(&path).unwrap();
    let llama = Llama::new(CpuBackend, &m.config, &m.weights).unwrap();
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2_parity.json")).unwrap())
            .unwrap();
    let cases = fx["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 3);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        // Our chat template rendering and tokenisation must give transformers' ids.
        let rendered = m
            .tokenizer
            .render_chat(&[Message::new("user", prompt)], true)
            .unwrap();
        assert_eq!(
            rendered,
            case["rendered"].as_str().unwrap(),
            "chat template for {prompt:?}"
        );
        let ids: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            m.tokenizer
                .encode_chat(&[Message::new("user", prompt)], true)
                .unwrap(),
            ids,
            "ids for {prompt:?}"
        );

        let mut cache = llama.new_cache(1, ids.len()).unwrap();
        let out = llama
            .forward(&ids, 1, &mut cache, None, &[], LogitsMode::Last)
            .unwrap();
        let logits = out.logits.unwrap();
        let top_ids = case["top10_ids"].as_array().unwrap();
        let top_vals = case["top10_logits"].as_array().unwrap();
        let scale = top_vals[0].as_f64().unwrap().abs() as f32;
        for (id, val) in top_ids.iter().zip(top_vals) {
            let (id, val) = (id.as_u64().unwrap() as usize, val.as_f64().unwrap() as f32);
            let got = logits[id];
            assert!(
                (got - val).abs() <= 1e-3 * val.abs().max(scale),
                "{prompt:?}: logit of token {id}: ours {got}, transformers {val}"
            );
        }
        let want: Vec<u32> = case["greedy_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let opts = GenerateOptions {
            max_new_tokens: want.len(),
            sampling: Sampling::Greedy,
            stop_tokens: vec![],
            replay: true,
        };
        let got = generate(&llama, &ids, &opts, |_| Ok(())).unwrap();
        assert_eq!(
            got,
            want,
            "{prompt:?}: greedy tokens differ: ours {:?}",
            m.tokenizer.decode(&got, false)
        );
    }
}
