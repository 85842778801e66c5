//! `eval` end to end on the tiny fixture model: the report's numbers are computed (not
//! placeholders), a model evaluated against itself has zero KL and identical separation, and a
//! baseline comparison prints deltas.

mod common;

use repshield::attack::commands::AttackKind;
use repshield::eval::{read_report, run_eval, EvalArgs};
use repshield::llama::peft::save_peft;
use repshield::llama::{LoraAdapter, LoraConfig, LoraModule};
use repshield::model::load_model_path;
use repshield::util::Rng;

fn args(out: &std::path::Path) -> EvalArgs {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    EvalArgs {
        model: common::fixture("tiny-llama").display().to_string(),
        adapter: None,
        out: out.to_path_buf(),
        baseline: None,
        behaviors: root.join("data/harmbench_val.jsonl"),
        limit: 2,
        attacks: vec![AttackKind::Direct, AttackKind::Prefill],
        embedding_steps: 2,
        embedding_step_size: 1e-3,
        gen_tokens: 4,
        edgy: root.join("data/edgy_benign.jsonl"),
        edgy_limit: 3,
        heldout_benign: root.join("data/heldout/retain_chat.jsonl"),
        heldout_harmful: root.join("data/heldout/harmful_qa.jsonl"),
        device: "cpu".into(),
        batch: 1,
    }
}

#[test]
fn report_and_baseline_deltas() {
    let dir = tempfile::tempdir().unwrap();
    let base_dir = dir.path().join("base");
    let base = run_eval(&args(&base_dir)).unwrap();
    assert_eq!(base.asr["direct"].n, 2);
    assert_eq!(base.over_refusal_n, 3);
    assert_eq!(
        base.benign_kl, 0.0,
        "no adapter: the evaluated model is the original"
    );
    assert!(base.benign_ppl > 1.0 && base.benign_ppl.is_finite());
    // 4 generated tokens are at most 4 words: never substantive (the content judge needs 8),
    // so nothing counts as an attack success or as a healthy edgy-benign reply.
    for s in base.asr.values() {
        assert_eq!(s.asr, 0.0, "{s:?}");
    }
    assert_eq!(base.edgy_degenerate, 1.0);
    for l in &base.separation {
        assert!(
            (l.drift_harmful - 1.0).abs() < 1e-9
                && (l.centroid_cos_tuned - l.centroid_cos_original).abs() < 1e-12
        );
    }
    assert_eq!(read_report(&base_dir).unwrap(), base);
    assert!(base_dir.join("attacks.jsonl").is_file() && base_dir.join("report.md").is_file());
    let png = std::fs::read(base_dir.join("pca.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    assert_eq!(base.pca_plot.as_deref(), Some("pca.png"));

    // An adapter that changes the model: KL > 0, drift < 1, and deltas against the baseline.
    let m = load_model_path(&common::fixture("tiny-llama")).unwrap();
    let lcfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        layers: vec![0, 1],
        modules: LoraModule::ALL.to_vec(),
    };
    let mut ad = LoraAdapter::init(&m.config, lcfg, 3);
    let mut r = Rng::new(4);
    for p in &mut ad.pairs {
        p.b.iter_mut().for_each(|x| *x = r.normal() * 0.1);
    }
    let adir = dir.path().join("adapter");
    save_peft(&adir, &ad, "tiny").unwrap();
    let mut a = args(&dir.path().join("tuned"));
    a.adapter = Some(adir);
    a.baseline = Some(base_dir);
    let tuned = run_eval(&a).unwrap();
    assert!(tuned.benign_kl > 0.0);
    assert!(tuned
        .separation
        .iter()
        .skip(1)
        .any(|l| l.drift_harmful < 0.9999));
    let md = std::fs::read_to_string(dir.path().join("tuned/report.md")).unwrap();
    assert!(
        md.contains("against the baseline") && md.contains("(+"),
        "{md}"
    );
}

fn embedding_records(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("attacks.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["attack"] == "embedding")
        .collect()
}

#[test]
fn batched_embedding_attack_in_eval_matches_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for batch in [1, 3] {
        let mut a = args(&dir.path().join(format!("batch{batch}")));
        a.attacks = vec![AttackKind::Embedding];
        a.limit = 3;
        a.batch = batch;
        let r = run_eval(&a).unwrap();
        assert_eq!(r.asr["embedding"].n, 3);
        runs.push(embedding_records(&a.out));
    }
    let (single, batched) = (&runs[0], &runs[1]);
    assert_eq!(single.len(), 3);
    for (s, b) in single.iter().zip(batched) {
        assert_eq!(s["id"], b["id"]);
        // Same behaviours, same start: the padded, masked batch sees each conversation as
        // the single run does, so every loss before an update agrees to rounding.
        let (ls, lb) = (
            s["losses"].as_array().unwrap(),
            b["losses"].as_array().unwrap(),
        );
        assert_eq!(ls.len(), lb.len(), "{s} vs {b}");
        for (x, y) in ls.iter().zip(lb) {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!((x - y).abs() <= 1e-4 * x.abs(), "loss {x} vs {y}");
        }
    }
}
