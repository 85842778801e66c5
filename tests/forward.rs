//! Forward-pass invariants on random weights: KV-cache decode equals full prefill, batching and
//! padding do not change a sequence's outputs, LoRA with B = 0 is the identity and with B != 0
//! equals merging B A into the weights, the matmul paths agree with a naive product, and
//! top-p generation samples each token from its logits with one uniform from the seeded `Rng`.

use repshield::backend::cpu::{matmul::matmul_fwd, CpuBackend};
use repshield::backend::Backend;
use repshield::llama::generate::sample_top_p;
use repshield::llama::{
    generate, GenerateOptions, Llama, LogitsMode, LoraAdapter, LoraConfig, LoraModule, Sampling,
};
use repshield::model::{ModelConfig, ModelWeights, RopeScaling};
use repshield::util::Rng;

fn tiny_cfg(qkv_bias: bool, tie: bool) -> ModelConfig {
    ModelConfig {
        arch: if qkv_bias {
            "qwen2".into()
        } else {
            "llama".into()
        },
        vocab_size: 97,
        hidden_size: 48,
        intermediate_size: 80,
        num_layers: 3,
        num_heads: 6,
        num_kv_heads: 2,
        head_dim: 8,
        rms_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 16,
        }),
        tie_embeddings: tie,
        qkv_bias,
        max_position: 128,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

fn ids(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut r = Rng::new(seed);
    (0..n)
        .map(|_| (r.next_u64() % vocab as u64) as u32)
        .collect()
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn decode_with_cache_matches_full_prefill() {
    for (bias, tie) in [(false, false), (true, true)] {
        let cfg = tiny_cfg(bias, tie);
        let m = Llama::new(CpuBackend, &cfg, &ModelWeights::random(&cfg, 7)).unwrap();
        let seq = ids(21, 3, cfg.vocab_size);
        let mut c = m.new_cache(1, 32).unwrap();
        let full = m
            .forward(&seq, 1, &mut c, None, &[2], LogitsMode::All)
            .unwrap();
        let full_logits = full.logits.unwrap();
        let mut c2 = m.new_cache(1, 32).unwrap();
        m.forward(&seq[..13], 1, &mut c2, None, &[], LogitsMode::None)
            .unwrap();
        for t in 13..seq.len() {
            let step = m
                .forward(&seq[t..t + 1], 1, &mut c2, None, &[], LogitsMode::Last)
                .unwrap();
            let got = step.logits.unwrap();
            let want = &full_logits[t * cfg.vocab_size..(t + 1) * cfg.vocab_size];
            assert!(
                max_rel(&got, want) < 1e-5,
                "position {t}: {}",
                max_rel(&got, want)
            );
        }
        assert_eq!(c2.len, seq.len());
    }
}

/// `Llama::decode_step` in one reused workspace is `forward(.., LogitsMode::Last)` of the same
/// token, bit for bit (the same ops in the same order), with and without an adapter, for a
/// batch of two; it refuses a full cache and a token outside the vocabulary.
#[test]
fn decode_step_in_a_workspace_equals_forward_of_one_token() {
    let cfg = tiny_cfg(true, false);
    let w = ModelWeights::random(&cfg, 17);
    let mut m = Llama::new(CpuBackend, &cfg, &w).unwrap();
    let prompt = ids(2 * 6, 4, cfg.vocab_size);
    let next = ids(2 * 5, 5, cfg.vocab_size);
    for adapted in [false, true] {
        if adapted {
            let lcfg = LoraConfig {
                rank: 4,
                alpha: 8.0,
                layers: vec![0, 2],
                modules: LoraModule::ALL.to_vec(),
            };
            let mut adapter = LoraAdapter::init(&cfg, lcfg, 3);
            let mut r = Rng::new(5);
            for p in &mut adapter.pairs {
                p.b.iter_mut().for_each(|x| *x = r.normal() * 0.05);
            }
            m.attach_lora(&adapter).unwrap();
            assert!(m.uniform_lora_rank());
        }
        let (mut a, mut b) = (m.new_cache(2, 11).unwrap(), m.new_cache(2, 11).unwrap());
        for c in [&mut a, &mut b] {
            m.forward(&prompt, 2, c, None, &[], LogitsMode::None)
                .unwrap();
        }
        let mut ws = m.decode_workspace(2).unwrap();
        for t in next.chunks(2) {
            let want = m
                .forward(t, 2, &mut a, None, &[], LogitsMode::Last)
                .unwrap()
                .logits
                .unwrap();
            m.decode_step(t, &mut b, &mut ws).unwrap();
            assert_eq!(ws.logits, want, "adapter {adapted}, cache at {}", b.len);
        }
        assert_eq!((a.len, b.len), (11, 11));
        let err = m.decode_step(&next[..2], &mut b, &mut ws).unwrap_err();
        assert!(err.to_string().contains("KV cache is full"), "{err}");
        let mut c = m.new_cache(2, 11).unwrap();
        let err = m.decode_step(&[0, 97], &mut c, &mut ws).unwrap_err();
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    }
}

#[test]
fn batch_with_left_padding_matches_single_sequences() {
    let cfg = tiny_cfg(false, false);
    let m = Llama::new(CpuBackend, &cfg, &ModelWeights::random(&cfg, 11)).unwrap();
    // Sequence a fills the row; sequence b is left-padded by 4. Positions stay 0..T-1 (the
    // authors' layout), so b is compared with a single run that also starts at position 4.
    let a = ids(12, 5, cfg.vocab_size);
    let b_real = ids(8, 6, cfg.vocab_size);
    let mut b = vec![0u32; 4];
    b.extend(&b_real);
    let batch: Vec<u32> = a.iter().chain(&b).copied().collect();
    let mut mask = vec![1f32; 2 * 12];
    mask[12..16].fill(0.0);
    let mut c = m.new_cache(2, 12).unwrap();
    let out = m
        .forward(&batch, 2, &mut c, Some(&mask), &[1], LogitsMode::All)
        .unwrap();
    let logits = out.logits.unwrap();
    let v = cfg.vocab_size;

    let mut ca = m.new_cache(1, 12).unwrap();
    let la = m
        .forward(&a, 1, &mut ca, None, &[], LogitsMode::All)
        .unwrap()
        .logits
        .unwrap();
    assert!(max_rel(&logits[..12 * v], &la) < 1e-5);

    let mut single_mask = vec![1f32; 12];
    single_mask[..4].fill(0.0);
    let mut cb = m.new_cache(1, 12).unwrap();
    let lb = m
        .forward(&b, 1, &mut cb, Some(&single_mask), &[], LogitsMode::All)
        .unwrap()
        .logits
        .unwrap();
    assert!(max_rel(&logits[12 * v..], &lb) < 1e-5);
    // And the padding really is hidden: changing a pad id leaves the real tokens' logits alone.
    let mut b2 = b.clone();
    b2[1] = 42;
    let mut cb2 = m.new_cache(1, 12).unwrap();
    let lb2 = m
        .forward(&b2, 1, &mut cb2, Some(&single_mask), &[], LogitsMode::All)
        .unwrap()
        .logits
        .unwrap();
    assert!(max_rel(&lb2[4 * v..], &lb[4 * v..]) < 1e-6);
    let mut cb3 = m.new_cache(1, 12).unwrap();
    let lb3 = m
        .forward(&b2, 1, &mut cb3, None, &[], LogitsMode::All)
        .unwrap()
        .logits
        .unwrap();
    assert!(
        max_rel(&lb3[4 * v..], &lb[4 * v..]) > 1e-4,
        "without the mask the pad token must matter"
    );
}

#[test]
fn lora_zero_b_is_identity_and_nonzero_b_equals_merged_weights() {
    let cfg = tiny_cfg(false, true);
    let w = ModelWeights::random(&cfg, 13);
    let seq = ids(9, 8, cfg.vocab_size);
    let run = |m: &Llama<CpuBackend>| {
        let mut c = m.new_cache(1, 9).unwrap();
        m.forward(&seq, 1, &mut c, None, &[1, 3], LogitsMode::All)
            .unwrap()
    };
    let mut m = Llama::new(CpuBackend, &cfg, &w).unwrap();
    let base = run(&m);
    let lcfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        layers: vec![0, 1, 2],
        modules: LoraModule::ALL.to_vec(),
    };
    let mut adapter = LoraAdapter::init(&cfg, lcfg, 1);
    m.attach_lora(&adapter).unwrap();
    let fresh = run(&m);
    assert_eq!(
        fresh.logits.as_ref().unwrap(),
        base.logits.as_ref().unwrap(),
        "B = 0 must not change logits"
    );

    let mut r = Rng::new(99);
    for p in &mut adapter.pairs {
        p.b.iter_mut().for_each(|x| *x = r.normal() * 0.05);
    }
    m.attach_lora(&adapter).unwrap();
    let tuned = run(&m);
    assert!(
        max_rel(
            tuned.logits.as_ref().unwrap(),
            base.logits.as_ref().unwrap()
        ) > 1e-3
    );

    // Merge: W' = W + scale * B A.
    let mut merged = w.clone();
    let scale = adapter.config.scale();
    for p in &adapter.pairs {
        let (fan_in, fan_out) = p.module.dims(&cfg);
        let l = &mut merged.layers[p.layer];
        let t = match p.module {
            LoraModule::Q => &mut l.q,
            LoraModule::K => &mut l.k,
            LoraModule::V => &mut l.v,
            LoraModule::O => &mut l.o,
            LoraModule::Gate => &mut l.gate,
            LoraModule::Up => &mut l.up,
            LoraModule::Down => &mut l.down,
        };
        let r = adapter.config.rank;
        for o in 0..fan_out {
            for i in 0..fan_in {
                let ba: f32 = (0..r).map(|j| p.b[o * r + j] * p.a[j * fan_in + i]).sum();
                t.data[o * fan_in + i] += scale * ba;
            }
        }
    }
    let mm = Llama::new(CpuBackend, &cfg, &merged).unwrap();
    let merged_out = run(&mm);
    assert!(
        max_rel(
            tuned.logits.as_ref().unwrap(),
            merged_out.logits.as_ref().unwrap()
        ) < 1e-4
    );
    for ((i, a), (j, b)) in tuned.hidden.iter().zip(&merged_out.hidden) {
        assert_eq!(i, j);
        assert!(max_rel(a, b) < 1e-4, "hidden {i}");
    }
}

#[test]
fn matmul_paths_match_naive_product() {
    let mut r = Rng::new(4);
    for &(m, n, k) in &[
        (1, 7, 5),
        (3, 64, 33),
        (4, 65, 17),
        (5, 31, 64),
        (37, 29, 71),
    ] {
        let x: Vec<f32> = (0..m * k).map(|_| r.normal()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| r.normal()).collect();
        let init: Vec<f32> = (0..m * n).map(|_| r.normal()).collect();
        for acc in [false, true] {
            let mut out = init.clone();
            matmul_fwd(&x, &w, &mut out, m, n, k, 0.5, acc);
            for i in 0..m {
                for j in 0..n {
                    let dot: f64 = (0..k)
                        .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                        .sum();
                    let want = if acc { init[i * n + j] as f64 } else { 0.0 } + 0.5 * dot;
                    let got = out[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 + 1e-4 * want.abs(),
                        "({m},{n},{k}) acc={acc}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn capture_indices_follow_output_hidden_states() {
    let cfg = tiny_cfg(false, false);
    let m = Llama::new(CpuBackend, &cfg, &ModelWeights::random(&cfg, 21)).unwrap();
    let seq = ids(5, 2, cfg.vocab_size);
    let mut c = m.new_cache(1, 5).unwrap();
    let out = m
        .forward(&seq, 1, &mut c, None, &[0, 3, 1], LogitsMode::All)
        .unwrap();
    let idx: Vec<usize> = out.hidden.iter().map(|h| h.0).collect();
    assert_eq!(idx, vec![0, 1, 3]);
    // Index 0 is the raw embedding rows.
    let d = cfg.hidden_size;
    let w = ModelWeights::random(&cfg, 21);
    for (t, &id) in seq.iter().enumerate() {
        assert_eq!(
            &out.hidden[0].1[t * d..(t + 1) * d],
            &w.embed.data[id as usize * d..(id as usize + 1) * d]
        );
    }
    // Index L is normed: every row has RMS equal to the final norm weights' effect, and the
    // logits are exactly that row times the head.
    let hl = &out.hidden[2].1;
    let mut logits = vec![0f32; 5 * cfg.vocab_size];
    CpuBackend.matmul(
        hl,
        &w.lm_head.unwrap().data,
        &mut logits,
        5,
        cfg.vocab_size,
        d,
        1.0,
        false,
    );
    assert!(max_rel(&logits, out.logits.as_ref().unwrap()) < 1e-6);
}

#[test]
fn peft_adapter_round_trips_and_reports_bad_files() {
    use repshield::llama::peft::{load_peft, save_peft};
    let cfg = tiny_cfg(false, false);
    let lcfg = LoraConfig {
        rank: 4,
        alpha: 16.0,
        layers: vec![0, 2],
        modules: vec![LoraModule::Q, LoraModule::Down],
    };
    let mut adapter = LoraAdapter::init(&cfg, lcfg, 3);
    let mut r = Rng::new(5);
    for p in &mut adapter.pairs {
        p.b.iter_mut().for_each(|x| *x = r.normal());
    }
    let dir = tempfile::tempdir().unwrap();
    save_peft(dir.path(), &adapter, "tiny").unwrap();
    let back = load_peft(dir.path(), &cfg).unwrap();
    assert_eq!(back.config, adapter.config);
    for (a, b) in adapter.pairs.iter().zip(&back.pairs) {
        assert_eq!((a.layer, a.module), (b.layer, b.module));
        assert_eq!(a.a, b.a);
        assert_eq!(a.b, b.b);
    }
    let cfg_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        cfg_json["target_modules"],
        serde_json::json!(["down_proj", "q_proj"])
    );
    // A shape that disagrees with the model is named.
    let other = ModelConfig {
        hidden_size: 40,
        ..cfg.clone()
    };
    let err = format!("{:#}", load_peft(dir.path(), &other).unwrap_err());
    assert!(
        err.contains("adapter_model.safetensors") && err.contains("lora_A"),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("adapter_config.json")).unwrap();
    let err = format!("{:#}", load_peft(dir.path(), &cfg).unwrap_err());
    assert!(err.contains("adapter_config.json"), "{err}");
}

#[test]
fn top_p_generate_draws_one_seeded_uniform_per_token() {
    let cfg = tiny_cfg(false, false);
    let m = Llama::new(CpuBackend, &cfg, &ModelWeights::random(&cfg, 31)).unwrap();
    let prompt = ids(5, 8, cfg.vocab_size);
    let (temperature, top_p, seed) = (1.3, 0.9, 17);
    let opts = |sampling| GenerateOptions {
        max_new_tokens: 12,
        sampling,
        stop_tokens: vec![],
        replay: true,
    };
    let sampled = opts(Sampling::TopP {
        temperature,
        top_p,
        seed,
    });
    let got = generate(&m, &prompt, &sampled, |_| Ok(())).unwrap();
    // The same steps by hand: the logits of the last position, one uniform per token.
    let mut rng = Rng::new(seed);
    let mut cache = m.new_cache(1, prompt.len() + 12).unwrap();
    let mut input = prompt.clone();
    let mut want = Vec::new();
    for _ in 0..12 {
        let out = m
            .forward(&input, 1, &mut cache, None, &[], LogitsMode::Last)
            .unwrap();
        let logits = CpuBackend.download(out.logits.as_ref().unwrap()).unwrap();
        let next = sample_top_p(&logits, temperature, top_p, rng.uniform());
        want.push(next);
        input = vec![next];
    }
    assert_eq!(got, want);
    let greedy = generate(&m, &prompt, &opts(Sampling::Greedy), |_| Ok(())).unwrap();
    assert_ne!(
        got, greedy,
        "random weights at temperature 1.3 must sample off the argmax"
    );
}
