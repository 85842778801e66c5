//! Parity with PyTorch + peft, an oracle nobody here wrote: on the tiny fixture model with a
//! fixed LoRA adapter (B != 0, written by peft) and a fixed pre-tokenised batch, every term of
//! the three objectives and every entry of the LoRA gradients match
//! `tools/make_objective_fixtures.py` (transformers + peft, objectives re-implemented in
//! PyTorch from OBJECTIVES.md, computed in float64) to 1e-4 relative: |x - ref| <= 1e-4 * |ref|
//! for a term, |x - ref| <= 1e-4 * max|ref| over each gradient tensor. The adapter peft wrote
//! loads here and gives peft's logits, and `save_peft` writes the same tensors back.
//! Fixture schema: tests/fixtures/README.md ("objectives/").

use repshield::backend::cpu::CpuBackend;
use repshield::backend::Backend;
use repshield::llama::peft::{load_peft, save_peft};
use repshield::llama::{Input, Llama, LogitsMode, LoraAdapter, LoraGrads, LoraModule};
use repshield::model::{load_model_path, LoadedModel};
use repshield::train::commands::read_batch_set;
use repshield::train::data::{MaskMode, TokenBatch};
use repshield::train::trainer::{objective_step, Method, TrainConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TOL: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn dir() -> PathBuf {
    fixtures().join("objectives")
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(dir().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn read_f32(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
            let v = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name, (t.shape().to_vec(), v))
        })
        .collect()
}

struct Fixture {
    loaded: LoadedModel,
    adapter: LoraAdapter,
    model: Llama<CpuBackend>,
    benign: TokenBatch,
    harmful: TokenBatch,
    retain: TokenBatch,
}

fn fixture() -> Fixture {
    let loaded = load_model_path(&fixtures().join("tiny-llama")).unwrap();
    let adapter = load_peft(&dir().join("adapter"), &loaded.config).unwrap();
    assert_eq!(adapter.config.rank, 4);
    assert_eq!(adapter.config.alpha, 8.0);
    assert_eq!(adapter.config.layers, vec![0, 1]);
    assert_eq!(adapter.pairs.len(), 14);
    let mut model = Llama::new(CpuBackend, &loaded.config, &loaded.weights).unwrap();
    model.attach_lora(&adapter).unwrap();
    let path = dir().join("batch.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let set = |name: &str| read_batch_set(&st, &path, name).unwrap();
    let (benign, harmful, retain) = (set("benign"), set("harmful"), set("retain"));
    Fixture {
        loaded,
        adapter,
        model,
        benign,
        harmful,
        retain,
    }
}

/// The settings the fixture was made with (tools/make_objective_fixtures.py).
fn config(method: Method) -> TrainConfig {
    let c = TrainConfig {
        method,
        steps: 10,
        rank: 4,
        alpha: 8.0,
        target_layers: Some(vec![1, 2]),
        lora_layers: Some(vec![0, 1]),
        mask: MaskMode::ResponseAll,
        ..Default::default()
    };
    let s = &expected()["settings"];
    let t = &s["triplet"];
    assert_eq!(
        c.triplet.margin_benign,
        t["margin_benign"].as_f64().unwrap()
    );
    assert_eq!(
        c.triplet.margin_harmful,
        t["margin_harmful"].as_f64().unwrap()
    );
    assert_eq!(c.triplet.w_benign, t["w_benign"].as_f64().unwrap());
    assert_eq!(c.triplet.w_harmful, t["w_harmful"].as_f64().unwrap());
    assert_eq!(c.triplet.w_kl, t["w_kl"].as_f64().unwrap());
    assert_eq!(c.triplet.temperature, t["temperature"].as_f64().unwrap());
    for (d, k) in [
        (c.triplet.benign_pos, "benign_pos"),
        (c.triplet.benign_neg, "benign_neg"),
        (c.triplet.harmful_pos, "harmful_pos"),
        (c.triplet.harmful_neg, "harmful_neg"),
    ] {
        assert_eq!(Ok(d), t[k].as_str().unwrap().parse().map_err(|_| ()), "{k}");
    }
    let r = &s["repbend"];
    assert_eq!(c.repbend.alpha, r["alpha"].as_f64().unwrap());
    assert_eq!(c.repbend.beta, r["beta"].as_f64().unwrap());
    assert_eq!(c.repbend.gamma, r["gamma"].as_f64().unwrap());
    assert_eq!(c.repbend.epsilon, r["epsilon"].as_f64().unwrap());
    assert_eq!(c.repbend.temperature, r["temperature"].as_f64().unwrap());
    let cb = &s["circuit_breakers"];
    assert_eq!(c.circuit_breakers.alpha, cb["alpha"].as_f64().unwrap());
    assert!(!c.circuit_breakers.retain_masked_mean);
    assert_eq!(c.steps as u64, cb["max_steps"].as_u64().unwrap());
    c
}

/// `max |x - ref| / max |ref|`.
fn rel_err(x: &[f32], r: &[f32]) -> f64 {
    assert_eq!(x.len(), r.len());
    let scale = r.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
    assert!(scale > 0.0, "all-zero reference");
    let diff = x
        .iter()
        .zip(r)
        .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    diff / scale
}

fn check_method(method: Method, key: &str) {
    let f = fixture();
    let c = config(method);
    let exp = &expected()["methods"][key];
    let step = expected()["settings"]["circuit_breakers"]["step"]
        .as_u64()
        .unwrap() as usize;
    let targets = c.targets(&f.loaded.config);
    assert_eq!(targets, vec![1, 2]);
    let mut grads = LoraGrads::new(&f.model).unwrap();
    let terms = objective_step(
        &f.model,
        &c,
        step,
        &targets,
        &f.benign,
        &f.harmful,
        &f.retain,
        Some(&mut grads),
        None,
        Default::default(),
    )
    .unwrap();

    let mut failures = Vec::new();
    let ref_terms = exp["terms"].as_object().unwrap();
    assert_eq!(terms.terms.len(), ref_terms.len(), "{key}: {terms:?}");
    let mut compare = |name: &str, x: f64, r: f64| {
        let err = (x - r).abs() / r.abs();
        eprintln!("{key:>16} {name:<12} ours {x:>14.8} pytorch {r:>14.8} rel err {err:.2e}");
        if err > TOL {
            failures.push(format!("{name}: ours {x}, pytorch {r}, rel err {err:.2e}"));
        }
    };
    for (name, x) in &terms.terms {
        let r = ref_terms
            .get(name)
            .unwrap_or_else(|| panic!("{key}: term {name} not in the fixture"))
            .as_f64()
            .unwrap();
        compare(name, *x, r);
    }
    compare("total", terms.total, exp["total"].as_f64().unwrap());

    let reference = read_f32(&dir().join(exp["grads_file"].as_str().unwrap()));
    assert_eq!(reference.len(), 28, "{key}: 2 layers x 7 modules x (A, B)");
    let (mut worst, mut worst_name) = (0f64, String::new());
    for layer in 0..2 {
        for m in LoraModule::ALL {
            let (ga, gb) = grads.get(layer, m).expect("a LoRA gradient buffer");
            for (ab, g) in [("A", ga), ("B", gb)] {
                let name = format!("{layer}.{}.{ab}", m.hf_name());
                let ours = f.model.backend.download(g).unwrap();
                let (_, r) = &reference[&name];
                let err = rel_err(&ours, r);
                if err > worst {
                    (worst, worst_name) = (err, name.clone());
                }
                if err > TOL {
                    failures.push(format!("gradient {name}: rel err {err:.2e}"));
                }
            }
        }
    }
    eprintln!(
        "{key:>16} LoRA grads: worst tensor {worst_name}, max |x - ref| / max|ref| = {worst:.2e}"
    );
    assert!(
        failures.is_empty(),
        "{key} differs from PyTorch + peft:\n{}",
        failures.join("\n")
    );
}

#[test]
fn triplet_matches_pytorch_peft() {
    check_method(Method::Triplet, "triplet");
}

#[test]
fn repbend_matches_pytorch_peft() {
    check_method(Method::Repbend, "repbend");
}

#[test]
fn circuit_breakers_matches_pytorch_peft() {
    check_method(Method::CircuitBreakers, "circuit_breakers");
}

fn benign_logits(model: &Llama<CpuBackend>, tb: &TokenBatch, lora: bool) -> Vec<f32> {
    let be = &model.backend;
    let mask = be.upload_f32(&tb.attention_mask).unwrap();
    let (out, _) = model
        .forward_train(
            Input::Ids(&tb.input_ids),
            tb.batch,
            tb.seq,
            Some(&mask),
            &[],
            LogitsMode::All,
            lora,
        )
        .unwrap();
    be.download(&out.logits.unwrap()).unwrap()
}

/// The adapter written by peft's `save_pretrained` loads here and gives peft's logits.
#[test]
fn peft_adapter_gives_peft_logits() {
    let f = fixture();
    let reference = read_f32(&dir().join("logits.safetensors"));
    let (shape, r) = &reference["benign.logits"];
    assert_eq!(
        shape,
        &[f.benign.batch, f.benign.seq, f.loaded.config.vocab_size]
    );
    let ours = benign_logits(&f.model, &f.benign, true);
    let err = rel_err(&ours, r);
    // The adapter matters: without it the logits are far from the reference.
    let frozen = rel_err(&benign_logits(&f.model, &f.benign, false), r);
    eprintln!("logits: rel err {err:.2e} with the adapter, {frozen:.2e} without");
    assert!(err <= TOL, "logits differ from peft's: rel err {err:.2e}");
    assert!(
        frozen > 100.0 * TOL,
        "the adapter barely changes the logits"
    );
}

/// `save_peft` writes peft's tensor names, shapes and values, and the config fields peft reads.
#[test]
fn save_peft_writes_what_peft_wrote() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    save_peft(tmp.path(), &f.adapter, "tests/fixtures/tiny-llama").unwrap();
    let ours = read_f32(&tmp.path().join("adapter_model.safetensors"));
    let theirs = read_f32(&dir().join("adapter/adapter_model.safetensors"));
    let mut names: Vec<_> = ours.keys().collect();
    names.sort();
    let mut want: Vec<_> = theirs.keys().collect();
    want.sort();
    assert_eq!(names, want);
    for (name, t) in &theirs {
        assert_eq!(&ours[name], t, "{name}");
    }
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap())
            .unwrap()
    };
    let (a, b) = (read(tmp.path()), read(&dir().join("adapter")));
    for k in [
        "peft_type",
        "task_type",
        "r",
        "target_modules",
        "layers_to_transform",
        "lora_dropout",
        "bias",
        "fan_in_fan_out",
        "use_rslora",
        "use_dora",
    ] {
        assert_eq!(a[k], b[k], "adapter_config.json: {k}");
    }
    assert_eq!(a["lora_alpha"].as_f64(), b["lora_alpha"].as_f64());
    // And it loads back unchanged.
    let back = load_peft(tmp.path(), &f.loaded.config).unwrap();
    assert_eq!(back.config, f.adapter.config);
    // With REPSHIELD_PYREF=/path/to/python (the reference stack of
    // tools/requirements-reference.txt), peft itself loads what we wrote and must reproduce the
    // fixture's logits.
    if let Ok(python) = std::env::var("REPSHIELD_PYREF") {
        let status = std::process::Command::new(python)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/make_objective_fixtures.py"))
            .arg("--check-adapter")
            .arg(tmp.path())
            .env("HF_HUB_OFFLINE", "1")
            .status()
            .unwrap();
        assert!(
            status.success(),
            "peft rejected the adapter save_peft wrote"
        );
    }
}
