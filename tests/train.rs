//! The trainer on the tiny fixture model: the loss falls, a stopped run resumed from its
//! checkpoint reproduces an uninterrupted run step for step, a non-finite loss stops the run
//! naming the step and term with the last checkpoint intact, and every method runs.

mod common;

use repshield::backend::cpu::CpuBackend;
use repshield::llama::Llama;
use repshield::model::{load_model_path, LoadedModel};
use repshield::train::trainer::{Method, TrainConfig, Trainer};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn write_data(dir: &Path) -> TrainConfig {
    let pairs = |name: &str, rows: &[(&str, &str)]| {
        let p = dir.join(name);
        let body: String = rows
            .iter()
            .map(|(a, b)| format!("{}\n", serde_json::json!({"prompt": a, "response": b})))
            .collect();
        std::fs::write(&p, body).unwrap();
        p
    };
    TrainConfig {
        // Benign pairs + refusals and the other sets hold two rows each, so with batch 2 every
        // step sees the same examples and losses are comparable from step to step.
        benign: pairs(
            "benign.jsonl",
            &[("how do I bake bread", "mix flour and water")],
        ),
        refusal: pairs(
            "refusal.jsonl",
            &[("how do I make poison", "I can't help with that.")],
        ),
        harmful: pairs(
            "harmful.jsonl",
            &[
                ("how do I make poison", "take the berries"),
                ("steal a car", "break the window"),
            ],
        ),
        retain: pairs(
            "retain.jsonl",
            &[
                ("tell me a joke", "why did the chicken"),
                ("say hi", "hi there"),
            ],
        ),
        steps: 20,
        batch: 2,
        rank: 4,
        alpha: 8.0,
        lr: Some(1e-3),
        target_layers: Some(vec![1, 2]),
        max_prompt: 20,
        max_response: 8,
        save_every: 2,
        // The runs below predate LoRA dropout and compare exact losses; its own test turns it on.
        lora_dropout: 0.0,
        ..Default::default()
    }
}

fn model(m: &LoadedModel) -> Llama<CpuBackend> {
    Llama::new(CpuBackend, &m.config, &m.weights).unwrap()
}

fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn triplet_loss_falls_and_resume_reproduces_the_run() {
    let m = load_model_path(&common::fixture("tiny-llama")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_data(tmp.path());
    let stop = Arc::new(AtomicBool::new(false));

    let full = tmp.path().join("full");
    let mut t = Trainer::new(model(&m), &m.tokenizer, "tiny", cfg.clone(), &full, false).unwrap();
    t.quiet = true;
    let o = t.run(&stop).unwrap();
    assert_eq!(o.steps_done, 20);
    let want = losses(&full);
    assert_eq!(want.len(), 20);
    // Step 1 starts at B = 0, where the benign l2 term sits at its non-differentiable minimum,
    // so the first update raises it; from there on the loss must fall steadily.
    assert!(want[19] < want[1] - 0.02, "loss should fall: {want:?}");
    let rising = want.windows(2).skip(1).filter(|w| w[1] > w[0]).count();
    assert!(rising <= 2, "loss should fall step after step: {want:?}");
    assert!(
        full.join("adapter_model.safetensors").is_file()
            && full.join("adapter_config.json").is_file()
    );

    // Stop after 3 steps (as Ctrl-C does), then resume.
    let part = tmp.path().join("part");
    let mut t = Trainer::new(model(&m), &m.tokenizer, "tiny", cfg.clone(), &part, false).unwrap();
    t.quiet = true;
    t.stop_after = Some(7);
    let o = t.run(&stop).unwrap();
    assert!(o.interrupted && o.steps_done == 7);
    let mut t = Trainer::new(model(&m), &m.tokenizer, "tiny", cfg.clone(), &part, true).unwrap();
    t.quiet = true;
    assert_eq!(t.state.step, 7);
    t.run(&stop).unwrap();
    let got = losses(&part);
    assert_eq!(got.len(), 20);
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(
            (a - b).abs() <= 1e-6 * b.abs(),
            "step {}: resumed {a} vs uninterrupted {b}",
            i + 1
        );
    }

    // A resumed run with a different configuration is refused.
    let other = TrainConfig {
        lr: Some(2e-3),
        ..cfg
    };
    let err = Trainer::new(model(&m), &m.tokenizer, "tiny", other, &part, true)
        .err()
        .expect("must refuse");
    assert!(format!("{err:#}").contains("different configuration"));
}

/// A checkpoint written before LoRA dropout existed has no `lora_dropout` in its state: it was
/// trained without dropout, so a resume must not switch on the default 0.05 halfway through.
#[test]
fn a_checkpoint_from_before_dropout_resumes_without_it() {
    let m = load_model_path(&common::fixture("tiny-llama")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        steps: 4,
        ..write_data(tmp.path())
    };
    assert_eq!(cfg.lora_dropout, 0.0);
    let stop = Arc::new(AtomicBool::new(false));
    let out = tmp.path().join("old");
    let mut t = Trainer::new(model(&m), &m.tokenizer, "tiny", cfg.clone(), &out, false).unwrap();
    t.quiet = true;
    t.stop_after = Some(2);
    t.run(&stop).unwrap();
    let state = out.join("checkpoint/state.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let c = v["config"].as_object_mut().unwrap();
    assert!(c.remove("lora_dropout").is_some(), "the field is written");
    std::fs::write(&state, v.to_string()).unwrap();

    // The default configuration (dropout 0.05) does not match what the checkpoint trained with.
    let default = TrainConfig {
        lora_dropout: TrainConfig::default().lora_dropout,
        ..cfg.clone()
    };
    assert!(default.lora_dropout > 0.0);
    let err = Trainer::new(model(&m), &m.tokenizer, "tiny", default, &out, true)
        .err()
        .expect("must refuse to switch dropout on");
    assert!(format!("{err:#}").contains("different configuration"));
    // Resuming without dropout continues the run.
    let mut t = Trainer::new(model(&m), &m.tokenizer, "tiny", cfg, &out, true).unwrap();
    t.quiet = true;
    assert_eq!(t.state.step, 2);
    t.run(&stop).unwrap();
    assert_eq!(losses(&out).len(), 4);
}

/// LoRA dropout at the default 0.05: it changes the run (so it is really on), a stopped and
/// resumed run draws the same masks as the uninterrupted one (losses bit for bit), and the
/// adapter records the probability.
#[test]
fn lora_dropout_changes_the_run_and_resume_reproduces_it_exactly() {
    let m = load_model_path(&common::fixture("tiny-llama")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        steps: 8,
        // Two micro-batches per step: each draws its own masks.
        grad_accum: 2,
        lora_dropout: 0.05,
        ..write_data(tmp.path())
    };
    assert_eq!(TrainConfig::default().lora_dropout, 0.05);
    let stop = Arc::new(AtomicBool::new(false));
    let run = |cfg: &TrainConfig, out: &Path| {
        let mut t = Trainer::new(model(&m), &m.tokenizer, "tiny", cfg.clone(), out, false).unwrap();
        t.quiet = true;
        t.run(&stop).unwrap();
        losses(out)
    };
    let full = tmp.path().join("full");
    let want = run(&cfg, &full);
    assert_eq!(want.len(), 8);
    let off = run(
        &TrainConfig {
            lora_dropout: 0.0,
            ..cfg.clone()
        },
        &tmp.path().join("off"),
    );
    // Step 1 starts at B = 0, where the LoRA path contributes nothing either way.
    assert_eq!(want[0], off[0]);
    assert!(
        want.iter().zip(&off).skip(1).all(|(a, b)| a != b),
        "dropout must change every later step: {want:?} vs {off:?}"
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["lora_dropout"].as_f64(), Some(0.05));

    let part = tmp.path().join("part");
    let mut t = Trainer::new(model(&m), &m.tokenizer, "tiny", cfg.clone(), &part, false).unwrap();
    t.quiet = true;
    t.stop_after = Some(3);
    assert!(t.run(&stop).unwrap().interrupted);
    let mut t = Trainer::new(model(&m), &m.tokenizer, "tiny", cfg.clone(), &part, true).unwrap();
    t.quiet = true;
    assert_eq!(t.state.step, 3);
    t.run(&stop).unwrap();
    assert_eq!(losses(&part), want, "resumed vs uninterrupted");

    // The probability is part of the run: resuming with another is refused.
    let other = TrainConfig {
        lora_dropout: 0.1,
        ..cfg
    };
    let err = Trainer::new(model(&m), &m.tokenizer, "tiny", other, &part, true)
        .err()
        .expect("must refuse");
    assert!(format!("{err:#}").contains("different configuration"));
}

#[test]
fn non_finite_loss_stops_with_step_and_term_and_keeps_the_checkpoint() {
    let m = load_model_path(&common::fixture("tiny-llama")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // An absurd learning rate overflows the LoRA weights on the first update.
    let cfg = TrainConfig {
        lr: Some(1e38),
        save_every: 1,
        ..write_data(tmp.path())
    };
    let out = tmp.path().join("run");
    let mut t = Trainer::new(model(&m), &m.tokenizer, "tiny", cfg, &out, false).unwrap();
    t.quiet = true;
    let err = format!(
        "{:#}",
        t.run(&Arc::new(AtomicBool::new(false)))
            .err()
            .expect("must stop")
    );
    assert!(
        err.contains("step 2") && err.contains("not finite"),
        "{err}"
    );
    assert!(
        err.contains("benign")
            || err.contains("harmful")
            || err.contains("kl")
            || err.contains("grad"),
        "{err}"
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["step"], 1, "the step-1 checkpoint survives");
}

#[test]
fn repbend_and_circuit_breakers_run_and_move_their_terms() {
    let m = load_model_path(&common::fixture("tiny-llama")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for method in [Method::Repbend, Method::CircuitBreakers] {
        let cfg = TrainConfig {
            method,
            steps: 4,
            lr: Some(1e-2),
            ..write_data(tmp.path())
        };
        let out = tmp.path().join(format!("{method:?}"));
        let mut t = Trainer::new(model(&m), &m.tokenizer, "tiny", cfg, &out, false).unwrap();
        t.quiet = true;
        // A fresh adapter (B = 0) makes h' = h, where cos(h', h) is at its maximum and has an
        // exactly zero gradient in exact arithmetic (bf16 round-off is what moves the authors'
        // runs off it). Start from a slightly perturbed B so the test exercises the objective.
        let mut rng = repshield::util::Rng::new(5);
        for p in &mut t.adapter.pairs {
            p.b.iter_mut().for_each(|x| *x = rng.normal() * 1e-2);
        }
        let adapter = t.adapter.clone();
        t.model.attach_lora(&adapter).unwrap();
        t.run(&Arc::new(AtomicBool::new(false))).unwrap();
        let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), 4);
        let term = if method == Method::Repbend {
            "unsafe_dist"
        } else {
            "cb"
        };
        let (a, b) = (
            rows[0][term].as_f64().unwrap(),
            rows[3][term].as_f64().unwrap(),
        );
        if method == Method::Repbend {
            assert!(
                b > a,
                "RepBend pushes unsafe representations away: {a} -> {b}"
            );
        } else {
            assert!(
                b < a,
                "Circuit Breakers lowers cos(h', h) on harmful data: {a} -> {b}"
            );
        }
        assert!(rows[0]["grad_norm_q"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn embedding_mining_runs_attacks_uses_them_and_resumes_exactly() {
    use repshield::train::mining::{MiningConfig, MiningKind};
    let m = load_model_path(&common::fixture("tiny-llama")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mining = MiningConfig {
        kind: MiningKind::Embedding,
        every: 1,
        prob: 0.3,
        attack_steps: 3,
        n_soft: 2,
        target_tokens: 3,
        success_loss: 1e9, // the tiny model is never "attacked successfully" by a real bar
        ..Default::default()
    };
    let cfg = TrainConfig {
        steps: 6,
        max_prompt: 24,
        mining,
        ..write_data(tmp.path())
    };
    let stop = Arc::new(AtomicBool::new(false));
    let full = tmp.path().join("full");
    let mut t = Trainer::new(model(&m), &m.tokenizer, "tiny", cfg.clone(), &full, false).unwrap();
    t.quiet = true;
    t.run(&stop).unwrap();
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(full.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let used: u64 = rows
        .iter()
        .map(|r| r["mining_rows"].as_u64().unwrap())
        .sum();
    assert!(
        used > 0,
        "some steps must use attacked harmful representations: {rows:?}"
    );
    let per_step: Vec<u64> = rows
        .iter()
        .map(|r| r["mining_rows"].as_u64().unwrap())
        .collect();
    assert!(
        per_step.contains(&0),
        "with prob 0.3 some steps stay clean: {per_step:?}"
    );
    // The attack runs only on the steps that mine, and its loss is logged from then on.
    let first = per_step.iter().position(|&r| r > 0).unwrap();
    assert!(rows[..first]
        .iter()
        .all(|r| r.get("mining_attack_loss").is_none()));
    assert!(rows[first]["mining_attack_loss"].as_f64().unwrap() > 0.0);
    assert!(full.join("checkpoint/mining.safetensors").is_file());

    let part = tmp.path().join("part");
    let mut t = Trainer::new(model(&m), &m.tokenizer, "tiny", cfg.clone(), &part, false).unwrap();
    t.quiet = true;
    t.stop_after = Some(3);
    t.run(&stop).unwrap();
    let mut t = Trainer::new(model(&m), &m.tokenizer, "tiny", cfg, &part, true).unwrap();
    t.quiet = true;
    t.run(&stop).unwrap();
    let (a, b) = (losses(&full), losses(&part));
    for (i, (x, y)) in b.iter().zip(&a).enumerate() {
        assert!(
            (x - y).abs() <= 1e-6 * y.abs(),
            "step {}: resumed {x} vs uninterrupted {y}",
            i + 1
        );
    }
}

#[test]
fn latent_mining_trains_an_adversary_uses_it_and_resumes_exactly() {
    use repshield::train::mining::{Miner, MiningConfig, MiningKind};
    let m = load_model_path(&common::fixture("tiny-llama")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mining = MiningConfig {
        kind: MiningKind::Latent,
        every: 2,
        prob: 0.5,
        attack_steps: 4,
        step_size: 1e-2,
        target_tokens: 4,
        success_loss: 1e9,
        latent_layers: Some((1, 1)),
        ..Default::default()
    };
    let cfg = TrainConfig {
        steps: 6,
        max_prompt: 24,
        mining: mining.clone(),
        ..write_data(tmp.path())
    };

    // The adversary lowers the tuned model's CE on the harmful answers below the clean CE.
    let tuned = model(&m);
    let mut exs = repshield::train::data::read_jsonl(&cfg.harmful, true).unwrap();
    exs.truncate(2);
    let enc = repshield::train::data::Encoder::new(
        &m.tokenizer,
        repshield::train::data::Layout {
            max_prompt: 24,
            max_response: cfg.max_response,
        },
    );
    let tb = enc.batch(&exs).unwrap();
    let mut clean = Miner::new(
        MiningConfig {
            attack_steps: 0,
            ..mining.clone()
        },
        1,
    );
    let l0 = clean.refresh_latent(&tuned, &tb).unwrap();
    let mut miner = Miner::new(
        MiningConfig {
            attack_steps: 20,
            ..mining.clone()
        },
        1,
    );
    let l1 = miner.refresh_latent(&tuned, &tb).unwrap();
    assert!(l1 < l0, "adversary CE {l1} !< clean {l0}");
    assert_eq!(miner.state.latent_index, Some(1));

    let stop = Arc::new(AtomicBool::new(false));
    let full = tmp.path().join("full");
    let mut t = Trainer::new(model(&m), &m.tokenizer, "tiny", cfg.clone(), &full, false).unwrap();
    t.quiet = true;
    t.run(&stop).unwrap();
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(full.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let per_step: Vec<u64> = rows
        .iter()
        .map(|r| r["mining_rows"].as_u64().unwrap())
        .collect();
    assert!(
        per_step.iter().any(|&r| r > 0) && per_step.contains(&0),
        "with prob 0.5 some steps mine and some stay clean: {per_step:?}"
    );
    assert!(rows[0]["mining_attack_loss"].as_f64().unwrap() > 0.0);

    let part = tmp.path().join("part");
    let mut t = Trainer::new(model(&m), &m.tokenizer, "tiny", cfg.clone(), &part, false).unwrap();
    t.quiet = true;
    t.stop_after = Some(3);
    t.run(&stop).unwrap();
    let mut t = Trainer::new(model(&m), &m.tokenizer, "tiny", cfg, &part, true).unwrap();
    t.quiet = true;
    t.run(&stop).unwrap();
    let (a, b) = (losses(&full), losses(&part));
    assert_eq!(a.len(), 6);
    for (i, (x, y)) in b.iter().zip(&a).enumerate() {
        assert!(
            (x - y).abs() <= 1e-6 * y.abs(),
            "step {}: resumed {x} vs uninterrupted {y}",
            i + 1
        );
    }
}
