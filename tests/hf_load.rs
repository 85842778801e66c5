//! Loading Hugging Face model directories: weights in f32/f16/bf16 (single file and sharded)
//! arrive exactly, and every kind of broken directory fails with a message that names the file
//! (and the tensor, where there is one).

use repshield::model::hf::{load_hf_dir, SafetensorsSource};
use repshield::model::{load_model_path, HostTensor, LoadedModel, TensorSource};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const VOCAB: usize = 12;
const HIDDEN: usize = 4;
const FFN: usize = 6;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = 2;
const LAYERS: usize = 2;

fn config_json(tie: bool) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 64,
        "tie_word_embeddings": tie,
        "bos_token_id": 1,
        "eos_token_id": 2
    })
}

/// Every tensor a LLaMA checkpoint with the constants above holds, with its shape.
fn tensor_shapes(tie: bool) -> Vec<(String, Vec<usize>)> {
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![VOCAB, HIDDEN])];
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        for (n, s) in [
            ("input_layernorm.weight", vec![HIDDEN]),
            ("self_attn.q_proj.weight", vec![q, HIDDEN]),
            ("self_attn.k_proj.weight", vec![kv, HIDDEN]),
            ("self_attn.v_proj.weight", vec![kv, HIDDEN]),
            ("self_attn.o_proj.weight", vec![HIDDEN, q]),
            ("post_attention_layernorm.weight", vec![HIDDEN]),
            ("mlp.gate_proj.weight", vec![FFN, HIDDEN]),
            ("mlp.up_proj.weight", vec![FFN, HIDDEN]),
            ("mlp.down_proj.weight", vec![HIDDEN, FFN]),
        ] {
            v.push((format!("{p}.{n}"), s));
        }
    }
    v.push(("model.norm.weight".to_string(), vec![HIDDEN]));
    if !tie {
        v.push(("lm_head.weight".to_string(), vec![VOCAB, HIDDEN]));
    }
    v
}

/// Distinct, nonzero values per tensor that f16 and bf16 represent exactly (multiples of 1/16
/// below 16 in magnitude), so that every dtype must round-trip them bit for bit.
fn known_values(tensor_index: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7 + tensor_index * 13) % 61) as f32 / 16.0 - 1.875)
        .collect()
}

fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
        Dtype::I8 | Dtype::F8_E4M3 => values.iter().map(|x| *x as i8 as u8).collect(),
        other => panic!("test helper cannot encode {other:?}"),
    }
}

/// (name, dtype, shape, bytes) of tensors to write.
type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn model_tensors(tie: bool, dtype: Dtype) -> (Tensors, HashMap<String, Vec<f32>>) {
    let mut out = Vec::new();
    let mut values = HashMap::new();
    for (i, (name, shape)) in tensor_shapes(tie).into_iter().enumerate() {
        let vals = known_values(i, shape.iter().product());
        out.push((name.clone(), dtype, shape, encode(&vals, dtype)));
        values.insert(name, vals);
    }
    (out, values)
}

fn write_safetensors(path: &Path, tensors: &Tensors) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

const WORDS: [&str; 8] = [
    "<unk>", "<s>", "</s>", "<|eot|>", "hello", "world", "the", "sea",
];

fn tokenizer_json() -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> = WORDS
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), serde_json::json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = WORDS[..4]
        .iter()
        .enumerate()
        .map(|(i, w)| {
            serde_json::json!({"id": i, "content": w, "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";

fn write_json(path: &Path, v: &serde_json::Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

/// A complete model directory with single-file weights in `dtype`.
fn make_dir(dtype: Dtype, tie: bool) -> (tempfile::TempDir, HashMap<String, Vec<f32>>) {
    let dir = tempfile::tempdir().unwrap();
    write_json(&dir.path().join("config.json"), &config_json(tie));
    write_json(&dir.path().join("tokenizer.json"), &tokenizer_json());
    write_json(
        &dir.path().join("tokenizer_config.json"),
        &serde_json::json!({
            "bos_token": {"content": "<s>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false},
            "eos_token": "<|eot|>",
            "chat_template": TEMPLATE
        }),
    );
    let (tensors, values) = model_tensors(tie, dtype);
    write_safetensors(&dir.path().join("model.safetensors"), &tensors);
    (dir, values)
}

fn assert_exact(m: &LoadedModel, values: &HashMap<String, Vec<f32>>) {
    let w = &m.weights;
    let check = |name: &str, t: &HostTensor| {
        let want = &values[name];
        assert_eq!(&t.data, want, "{name} differs");
        assert!(t.data.iter().any(|x| *x != 0.0));
    };
    check("model.embed_tokens.weight", &w.embed);
    check("model.norm.weight", &w.final_norm);
    for (i, l) in w.layers.iter().enumerate() {
        let p = |n: &str| format!("model.layers.{i}.{n}");
        check(&p("input_layernorm.weight"), &l.attn_norm);
        check(&p("self_attn.q_proj.weight"), &l.q);
        check(&p("self_attn.k_proj.weight"), &l.k);
        check(&p("self_attn.v_proj.weight"), &l.v);
        check(&p("self_attn.o_proj.weight"), &l.o);
        check(&p("post_attention_layernorm.weight"), &l.mlp_norm);
        check(&p("mlp.gate_proj.weight"), &l.gate);
        check(&p("mlp.up_proj.weight"), &l.up);
        check(&p("mlp.down_proj.weight"), &l.down);
        assert_eq!(l.o.shape, vec![HIDDEN, HEADS * HEAD_DIM]);
        assert_eq!(l.down.shape, vec![HIDDEN, FFN]);
    }
    match &w.lm_head {
        Some(h) => check("lm_head.weight", h),
        None => assert!(!values.contains_key("lm_head.weight")),
    }
}

/// The error, printed with its whole context chain, as the CLI prints it.
fn load_err(dir: &Path) -> String {
    match load_hf_dir(dir) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("{msg}");
            msg
        }
    }
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error does not mention {p:?}:\n{err}");
    }
}

#[test]
fn loads_f32_weights_exactly() {
    let (dir, values) = make_dir(Dtype::F32, false);
    let m = load_hf_dir(dir.path()).unwrap();
    assert_exact(&m, &values);
    assert_eq!(m.file_dtype, "f32");
    assert_eq!(m.source, dir.path());
    let c = &m.config;
    assert_eq!(
        (c.vocab_size, c.hidden_size, c.intermediate_size),
        (VOCAB, HIDDEN, FFN)
    );
    assert_eq!(
        (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim),
        (LAYERS, HEADS, KV_HEADS, HEAD_DIM)
    );
    assert!(!c.tie_embeddings && m.weights.lm_head.is_some());
    // config.json's eos (2) first, then the tokenizer's eos token "<|eot|>" (3).
    assert_eq!(c.eos_token_ids, vec![2, 3]);
    assert_eq!(c.bos_token_id, Some(1));
    // Special tokens from tokenizer_config.json (bos as an AddedToken dict, eos as a string).
    assert_eq!(m.tokenizer.bos_token.as_deref(), Some("<s>"));
    assert_eq!(m.tokenizer.eos_token.as_deref(), Some("<|eot|>"));
    let text = m
        .tokenizer
        .render_chat(
            &[repshield::model::Message::new("user", " hello world ")],
            true,
        )
        .unwrap();
    assert_eq!(text, "<s><user>hello world<|eot|><assistant>");
    assert_eq!(
        m.tokenizer
            .encode_chat(
                &[repshield::model::Message::new("user", "hello sea")],
                false
            )
            .unwrap(),
        vec![1, 0, 0, 0, 4, 7, 3]
    );
}

#[test]
fn loads_f16_and_bf16_weights_exactly() {
    for (dtype, name) in [(Dtype::F16, "f16"), (Dtype::BF16, "bf16")] {
        let (dir, values) = make_dir(dtype, true);
        let m = load_hf_dir(dir.path()).unwrap();
        assert_exact(&m, &values);
        assert_eq!(m.file_dtype, name);
        assert!(m.config.tie_embeddings && m.weights.lm_head.is_none());
        // load_model_path dispatches a directory here too.
        let again = load_model_path(dir.path()).unwrap();
        assert_eq!(again.weights.embed, m.weights.embed);
    }
}

#[test]
fn large_tensors_convert_in_parallel_exactly() {
    // Above the parallel threshold and not a multiple of the chunk size.
    let n = (1 << 17) + 3;
    let vals: Vec<f32> = (0..n).map(|i| ((i % 509) as f32 - 254.0) / 8.0).collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.safetensors");
    let tensors = vec![
        (
            "bf16".to_string(),
            Dtype::BF16,
            vec![n],
            encode(&vals, Dtype::BF16),
        ),
        (
            "f16".to_string(),
            Dtype::F16,
            vec![n],
            encode(&vals, Dtype::F16),
        ),
        (
            "f32".to_string(),
            Dtype::F32,
            vec![n],
            encode(&vals, Dtype::F32),
        ),
    ];
    write_safetensors(&path, &tensors);
    let src = SafetensorsSource::open_file(&path).unwrap();
    assert_eq!(src.file_dtype(), "bf16/f16/f32");
    for name in ["bf16", "f16", "f32"] {
        let t = src.load(name).unwrap();
        assert_eq!(t.shape, vec![n]);
        assert_eq!(t.data, vals, "{name}");
    }
}

/// Writes the tensors of a model as two shards plus model.safetensors.index.json.
fn make_sharded(dtype_a: Dtype, dtype_b: Dtype) -> (tempfile::TempDir, HashMap<String, Vec<f32>>) {
    let (dir, _) = make_dir(Dtype::F32, false);
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let (tensors_a, values) = model_tensors(false, dtype_a);
    let (tensors_b, _) = model_tensors(false, dtype_b);
    let half = tensors_a.len() / 2;
    let shard1: Tensors = tensors_a[..half].to_vec();
    let shard2: Tensors = tensors_b[half..].to_vec();
    let f1 = "model-00001-of-00002.safetensors";
    let f2 = "model-00002-of-00002.safetensors";
    write_safetensors(&dir.path().join(f1), &shard1);
    write_safetensors(&dir.path().join(f2), &shard2);
    let mut map = serde_json::Map::new();
    for (n, ..) in &shard1 {
        map.insert(n.clone(), f1.into());
    }
    for (n, ..) in &shard2 {
        map.insert(n.clone(), f2.into());
    }
    write_json(
        &dir.path().join("model.safetensors.index.json"),
        &serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map}),
    );
    (dir, values)
}

#[test]
fn sharded_index_loads_every_tensor() {
    let (dir, values) = make_sharded(Dtype::BF16, Dtype::F32);
    let m = load_hf_dir(dir.path()).unwrap();
    assert_exact(&m, &values);
    assert_eq!(m.file_dtype, "bf16/f32");
    let src = SafetensorsSource::open_dir(dir.path()).unwrap();
    assert_eq!(src.tensor_names().len(), tensor_shapes(false).len());
    assert_eq!(src.info("model.norm.weight"), Some(("F32", &[HIDDEN][..])));
    assert!(src.origin().ends_with("model.safetensors.index.json"));
}

#[test]
fn truncated_safetensors_names_file_and_tensor() {
    let (dir, _) = make_dir(Dtype::F32, false);
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    // The tensor stored last is the one a cut-short file loses.
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let last = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .max_by_key(|(_, v)| v["data_offsets"][1].as_u64().unwrap())
        .unwrap()
        .0
        .clone();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let err = load_err(dir.path());
    assert_mentions(
        &err,
        &["model.safetensors", &format!("{last:?}"), "truncated"],
    );

    // Cut inside the header: no tensor to name, but the file and the cause.
    std::fs::write(&path, &bytes[..20]).unwrap();
    assert_mentions(&load_err(dir.path()), &["model.safetensors", "truncated"]);
    std::fs::write(&path, &bytes[..5]).unwrap();
    assert_mentions(&load_err(dir.path()), &["model.safetensors", "truncated"]);
}

#[test]
fn corrupt_header_json_names_file() {
    let (dir, _) = make_dir(Dtype::F32, false);
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8] = b'['; // header JSON now starts with '[' and no longer parses
    std::fs::write(&path, &bytes).unwrap();
    assert_mentions(
        &load_err(dir.path()),
        &["model.safetensors", "corrupt safetensors header", "JSON"],
    );

    // An absurd header length is corruption too, not an allocation.
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert_mentions(
        &load_err(dir.path()),
        &["model.safetensors", "corrupt safetensors header"],
    );
}

#[test]
fn offsets_past_the_end_name_file_and_tensor() {
    // A hand-written file whose header promises more data than it holds.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let header = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 12]);
    std::fs::write(&path, &bytes).unwrap();
    let err = format!("{:#}", SafetensorsSource::open_file(&path).err().unwrap());
    assert_mentions(&err, &["w.safetensors", "\"b\"", "[8, 24)", "12 bytes"]);

    // Offsets that disagree with dtype and shape are caught before any read.
    let header = br#"{"c":{"dtype":"BF16","shape":[3],"data_offsets":[0,4]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 4]);
    std::fs::write(&path, &bytes).unwrap();
    let err = format!("{:#}", SafetensorsSource::open_file(&path).err().unwrap());
    assert_mentions(&err, &["w.safetensors", "\"c\"", "need 6"]);
}

#[test]
fn unsupported_dtype_names_file_tensor_and_dtype() {
    for (dtype, label) in [(Dtype::I8, "I8"), (Dtype::F8_E4M3, "F8_E4M3")] {
        let (dir, _) = make_dir(Dtype::F32, false);
        let (mut tensors, _) = model_tensors(false, Dtype::F32);
        let victim = "model.layers.1.self_attn.q_proj.weight";
        let t = tensors.iter_mut().find(|t| t.0 == victim).unwrap();
        t.1 = dtype;
        t.3 = encode(&vec![1.0; t.2.iter().product()], dtype);
        write_safetensors(&dir.path().join("model.safetensors"), &tensors);
        let err = load_err(dir.path());
        assert_mentions(
            &err,
            &["model.safetensors", victim, label, "unsupported dtype"],
        );
    }
}

#[test]
fn missing_tensor_names_file_and_tensor() {
    let (dir, _) = make_dir(Dtype::F32, false);
    let (mut tensors, _) = model_tensors(false, Dtype::F32);
    let victim = "model.layers.1.mlp.up_proj.weight";
    tensors.retain(|t| t.0 != victim);
    write_safetensors(&dir.path().join("model.safetensors"), &tensors);
    assert_mentions(
        &load_err(dir.path()),
        &["model.safetensors", victim, "missing tensor"],
    );

    // Untied config but a checkpoint without lm_head.
    let (dir, _) = make_dir(Dtype::F32, false);
    let (tied_tensors, _) = model_tensors(true, Dtype::F32);
    write_safetensors(&dir.path().join("model.safetensors"), &tied_tensors);
    assert_mentions(
        &load_err(dir.path()),
        &["model.safetensors", "lm_head.weight"],
    );
}

#[test]
fn shape_disagreeing_with_config_names_tensor_and_shapes() {
    let (dir, _) = make_dir(Dtype::F32, false);
    let mut cfg = config_json(false);
    cfg["intermediate_size"] = serde_json::json!(FFN + 2);
    write_json(&dir.path().join("config.json"), &cfg);
    let err = load_err(dir.path());
    assert_mentions(
        &err,
        &[
            "model.safetensors",
            "model.layers.0.mlp.gate_proj.weight",
            "[6, 4]",
            "[8, 4]",
        ],
    );
}

#[test]
fn missing_tokenizer_json_is_a_clear_error() {
    let (dir, _) = make_dir(Dtype::F32, false);
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = load_err(dir.path());
    let want = format!(
        "{}: missing tokenizer",
        dir.path().join("tokenizer.json").display()
    );
    assert_mentions(&err, &[&want]);

    std::fs::write(dir.path().join("tokenizer.json"), "{not json").unwrap();
    assert_mentions(
        &load_err(dir.path()),
        &["tokenizer.json", "cannot parse tokenizer"],
    );
}

#[test]
fn missing_shard_names_index_shard_and_tensor() {
    let (dir, _) = make_sharded(Dtype::F32, Dtype::F32);
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_err(dir.path());
    // The first tensor (by name) that the index places in the missing shard.
    assert_mentions(
        &err,
        &[
            "model.safetensors.index.json",
            "model-00002-of-00002.safetensors",
            "missing",
            "\"lm_head.weight\"",
        ],
    );
}

#[test]
fn sharded_index_inconsistencies_name_the_tensor() {
    // A tensor present in a shard but absent from weight_map is missing, as transformers sees it.
    let (dir, _) = make_sharded(Dtype::F32, Dtype::F32);
    let index_path = dir.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let victim = "model.layers.0.self_attn.k_proj.weight";
    index["weight_map"].as_object_mut().unwrap().remove(victim);
    write_json(&index_path, &index);
    assert_mentions(
        &load_err(dir.path()),
        &["model.safetensors.index.json", victim, "missing tensor"],
    );

    // The index placing a tensor in the wrong shard.
    index["weight_map"][victim] = "model-00002-of-00002.safetensors".into();
    write_json(&index_path, &index);
    assert_mentions(
        &load_err(dir.path()),
        &["model-00002-of-00002.safetensors", victim, "not in shard"],
    );

    // A corrupt index.
    std::fs::write(&index_path, "{\"weight_map\": [").unwrap();
    assert_mentions(
        &load_err(dir.path()),
        &["model.safetensors.index.json", "not valid JSON"],
    );
}

#[test]
fn malformed_config_json_names_the_file() {
    let (dir, _) = make_dir(Dtype::F32, false);
    let cfg_path = dir.path().join("config.json");
    std::fs::write(&cfg_path, "{\"model_type\": \"llama\", \"hidden_size\": ").unwrap();
    assert_mentions(&load_err(dir.path()), &["config.json", "not valid JSON"]);

    let mut cfg = config_json(false);
    cfg.as_object_mut().unwrap().remove("num_attention_heads");
    write_json(&cfg_path, &cfg);
    assert_mentions(
        &load_err(dir.path()),
        &["config.json", "num_attention_heads"],
    );

    std::fs::remove_file(&cfg_path).unwrap();
    assert_mentions(&load_err(dir.path()), &["config.json", "missing"]);
}

#[test]
fn no_weights_at_all_is_a_clear_error() {
    let (dir, _) = make_dir(Dtype::F32, false);
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert_mentions(&load_err(dir.path()), &["no weights", "model.safetensors"]);
}

#[test]
fn tokenizer_larger_than_embedding_is_rejected() {
    let (dir, _) = make_dir(Dtype::F32, false);
    let mut tok = tokenizer_json();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    for i in 0..VOCAB {
        vocab.insert(format!("extra{i}"), serde_json::json!(WORDS.len() + i));
    }
    write_json(&dir.path().join("tokenizer.json"), &tok);
    assert_mentions(&load_err(dir.path()), &["tokenizer.json", "vocab_size"]);
}

#[test]
fn chat_template_sources_and_special_tokens() {
    // A list of named templates: "default" is the one used.
    let (dir, _) = make_dir(Dtype::F32, false);
    let cfg = serde_json::json!({
        "bos_token": null,
        "eos_token": {"content": "</s>"},
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "DEFAULT {{ eos_token }}{{ bos_token is defined }}"}
        ]
    });
    write_json(&dir.path().join("tokenizer_config.json"), &cfg);
    let m = load_hf_dir(dir.path()).unwrap();
    assert_eq!(
        m.tokenizer.render_chat(&[], false).unwrap(),
        "DEFAULT </s>False"
    );
    // eos from config.json (2) only: "</s>" is also id 2.
    assert_eq!(m.config.eos_token_ids, vec![2]);

    // chat_template.jinja beside it wins, as in transformers.
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "FILE {{ messages|length }}\n",
    )
    .unwrap();
    let m = load_hf_dir(dir.path()).unwrap();
    assert_eq!(m.tokenizer.render_chat(&[], true).unwrap(), "FILE 0");

    // No tokenizer_config.json at all: no template, no special tokens, still loads.
    std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
    let m = load_hf_dir(dir.path()).unwrap();
    assert!(m.tokenizer.chat_template.is_none() && m.tokenizer.eos_token.is_none());
    assert!(m.tokenizer.render_chat(&[], true).is_err());
}

#[test]
fn eos_ids_merge_config_generation_config_and_tokenizer() {
    let (dir, _) = make_dir(Dtype::F32, false);
    let mut cfg = config_json(false);
    cfg.as_object_mut().unwrap().remove("eos_token_id");
    cfg.as_object_mut().unwrap().remove("bos_token_id");
    write_json(&dir.path().join("config.json"), &cfg);
    // Empty config eos: the tokenizer's eos token fills it.
    let m = load_hf_dir(dir.path()).unwrap();
    assert_eq!(m.config.eos_token_ids, vec![3]);
    assert_eq!(m.config.bos_token_id, Some(1));
    // generation_config.json (Llama 3 Instruct lists <|eot_id|> only there) joins in.
    write_json(
        &dir.path().join("generation_config.json"),
        &serde_json::json!({"eos_token_id": [2, 5], "bos_token_id": 4}),
    );
    let m = load_hf_dir(dir.path()).unwrap();
    assert_eq!(m.config.eos_token_ids, vec![2, 5, 3]);
    assert_eq!(m.config.bos_token_id, Some(4));
}

#[test]
fn model_specs_resolve() {
    use repshield::model::fetch::{repshield_home, resolve_model};
    let err = format!(
        "{:#}",
        resolve_model("/definitely/not/here.gguf").unwrap_err()
    );
    assert_mentions(&err, &["/definitely/not/here.gguf", "not found"]);
    let (dir, _) = make_dir(Dtype::F32, true);
    assert_eq!(
        resolve_model(dir.path().to_str().unwrap()).unwrap(),
        dir.path()
    );
    // $REPSHIELD_SMOLLM2 short-cuts the fetch (only this test touches these variables).
    let fake = dir.path().join("fake.gguf");
    std::fs::write(&fake, b"GGUF").unwrap();
    std::env::set_var("REPSHIELD_SMOLLM2", &fake);
    assert_eq!(resolve_model("smollm2").unwrap(), fake);
    std::env::set_var("REPSHIELD_SMOLLM2", dir.path().join("absent.gguf"));
    assert_mentions(
        &format!("{:#}", resolve_model("smollm2").unwrap_err()),
        &["REPSHIELD_SMOLLM2", "absent.gguf"],
    );
    std::env::remove_var("REPSHIELD_SMOLLM2");
    std::env::set_var("REPSHIELD_HOME", dir.path());
    assert_eq!(repshield_home(), dir.path());
    std::env::remove_var("REPSHIELD_HOME");
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The transformers-written tiny checkpoints (tools/ makes them) load with the numbers in their
/// config.json; the tied one stores bf16 and no lm_head.
#[test]
fn real_tiny_llama_fixtures_load() {
    for (name, tied, dtype) in [
        ("tiny-llama", false, "f32"),
        ("tiny-llama-tied", true, "bf16"),
    ] {
        let dir = fixture(name);
        if !dir.join("config.json").is_file() {
            panic!("fixture {} is missing", dir.display());
        }
        let m = load_hf_dir(&dir).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let c = &m.config;
        assert_eq!(c.arch, "llama");
        assert_eq!(
            (c.vocab_size, c.hidden_size, c.intermediate_size),
            (512, 64, 128),
            "{name}"
        );
        assert_eq!(
            (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim),
            (2, 4, 2, 16),
            "{name}"
        );
        assert_eq!(c.max_position, 256);
        assert!((c.rms_eps - 1e-5).abs() < 1e-12);
        assert_eq!(c.tie_embeddings, tied);
        assert_eq!(m.weights.lm_head.is_none(), tied, "{name}");
        assert_eq!(m.file_dtype, dtype);
        assert_eq!(m.weights.layers.len(), 2);
        assert_eq!(m.weights.embed.shape, vec![512, 64]);
        assert!(m.weights.embed.data.iter().all(|x| x.is_finite()));
        assert!(m.weights.layers[1].down.data.iter().any(|x| *x != 0.0));
        assert!(
            c.eos_token_ids.contains(&2),
            "{name}: {:?}",
            c.eos_token_ids
        );
        assert!(m.tokenizer.vocab_size() <= c.vocab_size);
        if tied {
            assert!(matches!(
                c.rope_scaling,
                Some(repshield::model::RopeScaling::Llama3 { .. })
            ));
        }
    }
}
