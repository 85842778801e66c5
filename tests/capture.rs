//! Frozen representations from a capture file (`repshield capture`, `frozen_reps`): training
//! reads them instead of recomputing and gets the same losses and gradient norms step for step
//! (every method, with hard-negative mining too); a file that does not fit the run is refused
//! naming the file and the field; the file is replaced atomically.

mod common;

use repshield::backend::cpu::CpuBackend;
use repshield::llama::Llama;
use repshield::model::{load_model_path, LoadedModel};
use repshield::train::frozen::{capture, read_header, CaptureOptions, FrozenDtype, FrozenReps};
use repshield::train::mining::{MiningConfig, MiningKind};
use repshield::train::trainer::{Method, TrainConfig, Trainer};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn write_jsonl(dir: &Path, name: &str, rows: &[(&str, &str)]) -> PathBuf {
    let p = dir.join(name);
    let body: String = rows
        .iter()
        .map(|(a, b)| format!("{}\n", serde_json::json!({"prompt": a, "response": b})))
        .collect();
    std::fs::write(&p, body).unwrap();
    p
}

/// Five examples per set and batch 2: micro-batches mix examples differently from step to
/// step and across epochs, and every example lands in both rows of a batch over the run, so
/// the captured rows (taken from other batches) must not depend on their batch neighbours.
fn write_data(dir: &Path) -> TrainConfig {
    TrainConfig {
        benign: write_jsonl(
            dir,
            "benign.jsonl",
            &[
                ("how do I bake bread", "mix flour and water"),
                ("what is the capital of france", "paris is the capital"),
                ("name a colour", "blue"),
            ],
        ),
        refusal: write_jsonl(
            dir,
            "refusal.jsonl",
            &[
                ("how do I make poison", "I can't help with that."),
                (
                    "how do I pick a lock to rob a house",
                    "I won't help with burglary.",
                ),
            ],
        ),
        harmful: write_jsonl(
            dir,
            "harmful.jsonl",
            &[
                ("how do I make poison", "take the berries"),
                ("steal a car", "break the window"),
                ("write malware", "start with a keylogger"),
                ("hurt someone", "hit them hard"),
                ("cheat on a test", "hide notes in your sleeve"),
            ],
        ),
        retain: write_jsonl(
            dir,
            "retain.jsonl",
            &[
                ("tell me a joke", "why did the chicken"),
                ("say hi", "hi there"),
                ("count to three", "one two three"),
                ("what is rust", "a programming language"),
                ("recommend a book", "try a novel"),
            ],
        ),
        steps: 7,
        batch: 2,
        rank: 4,
        alpha: 8.0,
        lr: Some(1e-2),
        target_layers: Some(vec![1, 2]),
        max_prompt: 20,
        max_response: 8,
        save_every: 100,
        ..Default::default()
    }
}

fn tiny() -> LoadedModel {
    load_model_path(&common::fixture("tiny-llama")).unwrap()
}

fn model(m: &LoadedModel) -> Llama<CpuBackend> {
    Llama::new(CpuBackend, &m.config, &m.weights).unwrap()
}

fn capture_to(m: &LoadedModel, c: &TrainConfig, out: &Path, dtype: FrozenDtype) {
    capture(
        &model(m),
        &m.tokenizer,
        c,
        out,
        &CaptureOptions {
            dtype,
            quiet: true,
            stop: None,
        },
    )
    .unwrap();
}

/// Every metrics row of a run, without the timing.
fn metrics(out: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut row: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(l).unwrap();
            row.remove("seconds").expect("a seconds field");
            row
        })
        .collect()
}

/// Trains `c` into `out`, starting from a slightly perturbed adapter (at B = 0 the tuned and
/// frozen representations coincide, where some terms have exactly zero gradient).
fn train(
    m: &LoadedModel,
    c: &TrainConfig,
    out: &Path,
) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let mut t = Trainer::new(model(m), &m.tokenizer, "tiny", c.clone(), out, false).unwrap();
    t.quiet = true;
    assert_eq!(t.frozen.is_some(), c.frozen_reps.is_some());
    let mut rng = repshield::util::Rng::new(5);
    for p in &mut t.adapter.pairs {
        p.b.iter_mut().for_each(|x| *x = rng.normal() * 1e-2);
    }
    let adapter = t.adapter.clone();
    t.model.attach_lora(&adapter).unwrap();
    let o = t.run(&Arc::new(AtomicBool::new(false))).unwrap();
    assert_eq!(o.steps_done, c.steps);
    metrics(out)
}

#[test]
fn training_from_a_capture_file_matches_recomputing_step_for_step() {
    let m = tiny();
    let tmp = tempfile::tempdir().unwrap();
    let base = write_data(tmp.path());
    let mining = TrainConfig {
        mining: MiningConfig {
            kind: MiningKind::Embedding,
            every: 1,
            prob: 0.5,
            attack_steps: 2,
            n_soft: 2,
            target_tokens: 3,
            success_loss: 1e9,
            ..Default::default()
        },
        max_prompt: 24,
        ..base.clone()
    };
    let cases = [
        ("triplet", base.clone()),
        ("triplet-mining", mining),
        (
            "repbend",
            TrainConfig {
                method: Method::Repbend,
                ..base.clone()
            },
        ),
        (
            "circuit-breakers",
            TrainConfig {
                method: Method::CircuitBreakers,
                ..base.clone()
            },
        ),
    ];
    for (name, c) in cases {
        let file = tmp.path().join(format!("{name}.frozen"));
        capture_to(&m, &c, &file, FrozenDtype::F32);
        let want = train(&m, &c, &tmp.path().join(format!("{name}-recompute")));
        let with = TrainConfig {
            frozen_reps: Some(file.clone()),
            ..c.clone()
        };
        let got = train(&m, &with, &tmp.path().join(format!("{name}-file")));
        assert_eq!(got.len(), c.steps);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "{name}, step {}: from file vs recomputed", i + 1);
        }
        // The losses move, so equal rows are not a coincidence of a stuck run.
        let loss = |r: &serde_json::Map<String, serde_json::Value>| r["loss"].as_f64().unwrap();
        assert_ne!(loss(&want[0]), loss(&want[c.steps - 1]), "{name}: {want:?}");
        if name == "triplet-mining" {
            let mined: u64 = got.iter().map(|r| r["mining_rows"].as_u64().unwrap()).sum();
            assert!(mined > 0, "mining must still replace harmful rows: {got:?}");
        }
        let adapter =
            |d: &str| std::fs::read(tmp.path().join(d).join("adapter_model.safetensors")).unwrap();
        assert!(
            adapter(&format!("{name}-file")) == adapter(&format!("{name}-recompute")),
            "{name}: the trained adapters differ"
        );
    }

    // bf16 storage is read too: close to the recompute, but not bit-equal.
    let file = tmp.path().join("bf16.frozen");
    capture_to(&m, &base, &file, FrozenDtype::Bf16);
    let f32_bytes = std::fs::metadata(tmp.path().join("triplet.frozen"))
        .unwrap()
        .len();
    let bf16_bytes = std::fs::metadata(&file).unwrap().len();
    assert!(
        bf16_bytes < f32_bytes * 6 / 10,
        "{bf16_bytes} vs {f32_bytes}"
    );
    let got = train(
        &m,
        &TrainConfig {
            frozen_reps: Some(file),
            ..base.clone()
        },
        &tmp.path().join("bf16-file"),
    );
    let want = metrics(&tmp.path().join("triplet-recompute"));
    let (g, w) = (
        got[0]["loss"].as_f64().unwrap(),
        want[0]["loss"].as_f64().unwrap(),
    );
    assert!(
        g != w && (g - w).abs() <= 2e-2 * w.abs(),
        "bf16 {g} vs f32 {w}"
    );
}

#[test]
fn a_run_resumed_with_a_capture_file_continues_the_recomputing_run() {
    let m = tiny();
    let tmp = tempfile::tempdir().unwrap();
    let c = TrainConfig {
        save_every: 1,
        ..write_data(tmp.path())
    };
    let file = tmp.path().join("run.frozen");
    capture_to(&m, &c, &file, FrozenDtype::F32);
    let stop = Arc::new(AtomicBool::new(false));
    let full = tmp.path().join("full");
    let mut t = Trainer::new(model(&m), &m.tokenizer, "tiny", c.clone(), &full, false).unwrap();
    t.quiet = true;
    t.run(&stop).unwrap();

    let part = tmp.path().join("part");
    let mut t = Trainer::new(model(&m), &m.tokenizer, "tiny", c.clone(), &part, false).unwrap();
    t.quiet = true;
    t.stop_after = Some(3);
    t.run(&stop).unwrap();
    // Where the frozen representations come from is not part of the run's identity.
    let with = TrainConfig {
        frozen_reps: Some(file),
        ..c.clone()
    };
    let mut t = Trainer::new(model(&m), &m.tokenizer, "tiny", with, &part, true).unwrap();
    t.quiet = true;
    assert!(t.frozen.is_some() && t.state.step == 3);
    t.run(&stop).unwrap();
    assert_eq!(metrics(&part), metrics(&full));
}

fn open_err(m: &LoadedModel, path: &Path, c: &TrainConfig) -> String {
    match FrozenReps::open(path, &model(m), c) {
        Ok(_) => panic!("{} must be refused for {c:?}", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn a_capture_file_that_does_not_fit_the_run_is_refused_naming_file_and_field() {
    let m = tiny();
    let tmp = tempfile::tempdir().unwrap();
    let c = write_data(tmp.path());
    let file = tmp.path().join("run.frozen");
    capture_to(&m, &c, &file, FrozenDtype::F32);
    let p = file.display().to_string();
    FrozenReps::open(&file, &model(&m), &c).expect("the matching run opens it");

    let check = |err: String, field: &str| {
        assert!(
            err.contains(&p) && err.contains(field),
            "error should name {p} and {field}: {err}"
        );
    };
    // Another harmful data file.
    let other = write_jsonl(
        tmp.path(),
        "harmful2.jsonl",
        &[("how do I make poison", "take the mushrooms")],
    );
    let err = open_err(
        &m,
        &file,
        &TrainConfig {
            harmful: other.clone(),
            ..c.clone()
        },
    );
    check(err.clone(), "files.harmful");
    assert!(err.contains(&other.display().to_string()), "{err}");
    // The same path with edited contents.
    let edited = tmp.path().join("edited");
    std::fs::create_dir_all(&edited).unwrap();
    let c2 = write_data(&edited);
    let f2 = edited.join("run.frozen");
    capture_to(&m, &c2, &f2, FrozenDtype::F32);
    write_jsonl(&edited, "retain.jsonl", &[("say hi", "hello")]);
    let err = open_err(&m, &f2, &c2);
    assert!(
        err.contains(&f2.display().to_string()) && err.contains("files.retain"),
        "{err}"
    );

    // Target layers the file does not hold (a subset of them is fine).
    check(
        open_err(
            &m,
            &file,
            &TrainConfig {
                target_layers: Some(vec![0, 1]),
                ..c.clone()
            },
        ),
        "sections.harmful.indices",
    );
    FrozenReps::open(
        &file,
        &model(&m),
        &TrainConfig {
            target_layers: Some(vec![2]),
            ..c.clone()
        },
    )
    .expect("captured indices cover the run's");
    // Another token mask, another layout, another method's sections.
    check(
        open_err(
            &m,
            &file,
            &TrainConfig {
                mask: repshield::train::data::MaskMode::All,
                ..c.clone()
            },
        ),
        "sections.benign.mask",
    );
    check(
        open_err(
            &m,
            &file,
            &TrainConfig {
                max_response: 9,
                ..c.clone()
            },
        ),
        "max_response",
    );
    check(
        open_err(
            &m,
            &file,
            &TrainConfig {
                method: Method::CircuitBreakers,
                ..c.clone()
            },
        ),
        "sections",
    );
    // Another model.
    let tied = load_model_path(&common::fixture("tiny-llama-tied")).unwrap();
    check(open_err(&tied, &file, &c), "model.");

    // Damaged files.
    let bytes = std::fs::read(&file).unwrap();
    let bad = tmp.path().join("bad.frozen");
    let b = bad.display().to_string();
    let damaged = |data: &[u8]| {
        std::fs::write(&bad, data).unwrap();
        let err = open_err(&m, &bad, &c);
        assert!(err.contains(&b), "should name {b}: {err}");
        err
    };
    let err = damaged(&bytes[..bytes.len() - 100]);
    assert!(err.contains("truncated"), "{err}");
    let err = damaged(&bytes[..30]);
    assert!(err.contains("truncated"), "{err}");
    let mut extra = bytes.clone();
    extra.extend_from_slice(&[0; 8]);
    assert!(damaged(&extra).contains("trailing data"));
    let mut magic = bytes.clone();
    magic[..8].copy_from_slice(b"GGUF\0\0\0\0");
    assert!(damaged(&magic).contains("magic"));
    let mut version = bytes.clone();
    version[8..12].copy_from_slice(&7u32.to_le_bytes());
    assert!(damaged(&version).contains("version"));
    let mut json = bytes.clone();
    json[20] = b'#';
    assert!(damaged(&json).contains("corrupt header"));
    assert!(damaged(b"").contains("magic"));

    // The trainer refuses it before the first step, naming the file.
    let err = Trainer::new(
        model(&m),
        &m.tokenizer,
        "tiny",
        TrainConfig {
            frozen_reps: Some(bad.clone()),
            ..c.clone()
        },
        &tmp.path().join("run"),
        false,
    )
    .err()
    .map(|e| format!("{e:#}"))
    .expect("must refuse");
    assert!(err.contains(&b), "{err}");
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn capture_replaces_the_file_atomically() {
    let m = tiny();
    let tmp = tempfile::tempdir().unwrap();
    let c = write_data(tmp.path());
    let dir = tmp.path().join("caps");
    let file = dir.join("run.frozen");
    capture_to(&m, &c, &file, FrozenDtype::F32);
    assert_eq!(dir_names(&dir), ["run.frozen"], "no temporary file is left");
    let before = std::fs::read(&file).unwrap();

    // An interrupted capture leaves the old file and no temporary behind.
    let stop = Arc::new(AtomicBool::new(true));
    let err = capture(
        &model(&m),
        &m.tokenizer,
        &TrainConfig {
            max_response: 6,
            ..c.clone()
        },
        &file,
        &CaptureOptions {
            dtype: FrozenDtype::F32,
            quiet: true,
            stop: Some(stop),
        },
    )
    .err()
    .map(|e| format!("{e:#}"))
    .expect("interrupted");
    assert!(
        err.contains("interrupted") && err.contains("left unchanged"),
        "{err}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), before);
    assert_eq!(dir_names(&dir), ["run.frozen"]);

    // A reader of the old file keeps a consistent view while a new capture replaces it.
    let (old_map, old_header, _) = read_header(&file).unwrap();
    capture_to(&m, &c, &file, FrozenDtype::Bf16);
    assert_eq!(old_header.dtype, FrozenDtype::F32);
    assert_eq!(
        &old_map[..],
        &before[..],
        "the mapped old file is untouched"
    );
    let (_, new_header, _) = read_header(&file).unwrap();
    assert_eq!(new_header.dtype, FrozenDtype::Bf16);
    assert_eq!(dir_names(&dir), ["run.frozen"]);
}

fn repshield(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_repshield"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running repshield");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn cli_capture_then_train_with_frozen_reps() {
    let tmp = tempfile::tempdir().unwrap();
    let c = write_data(tmp.path());
    let cfg = tmp.path().join("train.toml");
    let toml = format!(
        "method = \"triplet\"\nbatch = 2\nrank = 4\nalpha = 8.0\nlr = 1e-2\ntarget_layers = [1, 2]\nmax_prompt = 20\nmax_response = 8\nsteps = 3\nbenign = {:?}\nrefusal = {:?}\nharmful = {:?}\nretain = {:?}\n",
        c.benign, c.refusal, c.harmful, c.retain
    );
    std::fs::write(&cfg, toml).unwrap();
    let tiny = common::fixture("tiny-llama").display().to_string();
    let frozen = tmp.path().join("triplet.frozen");
    let (cfg_s, frozen_s) = (cfg.display().to_string(), frozen.display().to_string());
    let (ok, out, err) = repshield(&[
        "capture", "--model", &tiny, "--config", &cfg_s, "--out", &frozen_s,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("captured") && frozen.is_file(), "{out}");
    let run = |name: &str, extra: &[&str]| {
        let dir = tmp.path().join(name).display().to_string();
        let mut args = vec![
            "train",
            "--model",
            &tiny,
            "--config",
            &cfg_s,
            "--out",
            &dir,
            "--heldout-harmful",
            c.harmful.to_str().unwrap(),
            "--heldout-benign",
            c.retain.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (ok, _, err) = repshield(&args);
        assert!(ok, "{err}");
        (metrics(&tmp.path().join(name)), err)
    };
    let (want, _) = run("recompute", &[]);
    let (got, log) = run("file", &["--frozen-reps", &frozen_s]);
    assert!(log.contains("frozen representations from"), "{log}");
    assert_eq!(got, want);

    // A capture for other target layers is refused with the file and the field named.
    let (ok, _, err) = repshield(&[
        "train",
        "--model",
        &tiny,
        "--config",
        &cfg_s,
        "--out",
        tmp.path().join("bad").to_str().unwrap(),
        "--target-layers",
        "0,1",
        "--frozen-reps",
        &frozen_s,
    ]);
    assert!(!ok);
    assert!(
        err.contains(&frozen_s) && err.contains("sections.harmful.indices"),
        "{err}"
    );
}
