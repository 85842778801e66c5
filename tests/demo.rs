//! `demo` end to end on the tiny fixture model (the real run is `repshield demo` on smollm2):
//! both reports, the adapter and the plots exist, and the built-in config parses.

mod common;

use repshield::demo::{run_demo, DemoArgs, DEMO_CONFIG};
use repshield::eval::read_report;
use repshield::train::mining::MiningKind;
use repshield::train::trainer::{Method, TrainConfig};

#[test]
fn builtin_config_parses() {
    let c: TrainConfig = toml::from_str(DEMO_CONFIG).unwrap();
    assert_eq!(c.method, Method::Triplet);
    assert_eq!(c.mining.kind, MiningKind::Embedding);
    assert!(
        c.triplet.w_harmful > 0.6,
        "the demo scales the harmful term up (docs/TRAINING.md)"
    );
}

#[test]
fn demo_runs_end_to_end_on_the_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut c: TrainConfig = toml::from_str(DEMO_CONFIG).unwrap();
    c.target_layers = Some(vec![1, 2]);
    c.steps = 2;
    c.max_prompt = 24;
    c.mining.every = 1;
    c.mining.attack_steps = 2;
    let cfg_path = dir.path().join("demo.toml");
    std::fs::write(&cfg_path, toml::to_string(&c).unwrap()).unwrap();
    let out = dir.path().join("demo");
    run_demo(&DemoArgs {
        model: common::fixture("tiny-llama").display().to_string(),
        out: out.clone(),
        config: Some(cfg_path),
        steps: None,
        limit: 1,
        embedding_steps: 2,
        edgy_limit: 2,
        device: "cpu".into(),
    })
    .unwrap();
    let before = read_report(&out.join("before")).unwrap();
    let after = read_report(&out.join("after")).unwrap();
    assert_eq!(before.benign_kl, 0.0);
    assert!(
        after.benign_kl > 0.0,
        "the trained adapter changes the model"
    );
    assert!(after.adapter.is_some() && before.adapter.is_none());
    for f in [
        "before/pca.png",
        "after/pca.png",
        "after/report.md",
        "adapter/adapter_model.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
}

#[test]
fn every_shipped_config_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let c = TrainConfig::from_toml(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            assert!(c.triplet.w_harmful > 0.0 && c.steps > 0, "{}", p.display());
            n += 1;
        }
    }
    assert!(n >= 2);
}
