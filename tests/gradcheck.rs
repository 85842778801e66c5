//! Backward ops and the whole model's backward pass against central finite differences.
//! The CPU engine is f32: losses are accumulated in f64 and the step is 1e-3 (ops) or 1e-2
//! (whole model), so the tolerance is |numeric - analytic| <= 2e-2 * max|analytic| (ops) and
//! 3e-2 (model), far below the size of any real mistake (a wrong sign or a missing term is O(1)).

use repshield::backend::cpu::attention::{attention_bwd, attention_fwd, kv_store};
use repshield::backend::cpu::matmul::gemm_fwd;
use repshield::backend::cpu::rmsnorm::{rmsnorm_bwd, rmsnorm_fwd};
use repshield::backend::cpu::rope::rope_fwd;
use repshield::backend::cpu::swiglu::{swiglu_bwd, swiglu_fwd};
use repshield::backend::cpu::CpuBackend;
use repshield::backend::AttnShape;
use repshield::llama::{
    Input, LatentHook, Llama, LogitsMode, LoraAdapter, LoraConfig, LoraDropout, LoraGrads,
    LoraModule,
};
use repshield::model::{ModelConfig, ModelWeights, RopeScaling};
use repshield::util::Rng;

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal()).collect()
}

fn weighted_sum(out: &[f32], r: &[f32]) -> f64 {
    out.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// Checks `grad` against central differences of `f` at every element of `x`.
fn check(name: &str, x: &[f32], grad: &[f32], h: f32, tol: f64, f: impl Fn(&[f32]) -> f64) {
    let gmax = grad.iter().fold(0f32, |m, g| m.max(g.abs())) as f64;
    assert!(gmax > 0.0, "{name}: all-zero gradient");
    let mut xp = x.to_vec();
    let mut worst = 0f64;
    for i in 0..x.len() {
        xp[i] = x[i] + h;
        let fp = f(&xp);
        xp[i] = x[i] - h;
        let fm = f(&xp);
        xp[i] = x[i];
        let num = (fp - fm) / (2.0 * h as f64);
        worst = worst.max((num - grad[i] as f64).abs() / gmax);
    }
    assert!(
        worst < tol,
        "{name}: max |numeric - analytic| / max|grad| = {worst}"
    );
}

#[test]
fn rmsnorm_backward() {
    for &(rows, dim) in &[(3, 8), (2, 37)] {
        let (x, w, r) = (randn(rows * dim, 1), randn(dim, 2), randn(rows * dim, 3));
        let f = |x: &[f32]| {
            let mut y = vec![0f32; x.len()];
            rmsnorm_fwd(x, &w, dim, 1e-5, &mut y);
            weighted_sum(&y, &r)
        };
        let mut dx = vec![f32::NAN; x.len()];
        rmsnorm_bwd(&x, &w, &r, dim, 1e-5, &mut dx, false);
        check("rmsnorm", &x, &dx, 1e-3, 2e-2, f);
        // accumulate adds onto what is there
        let mut acc = vec![1.0f32; x.len()];
        rmsnorm_bwd(&x, &w, &r, dim, 1e-5, &mut acc, true);
        for (a, d) in acc.iter().zip(&dx) {
            assert!((a - 1.0 - d).abs() < 1e-6);
        }
    }
}

#[test]
fn swiglu_backward() {
    let n = 53;
    let (g, u, r) = (randn(n, 4), randn(n, 5), randn(n, 6));
    let mut dg = vec![f32::NAN; n];
    let mut du = vec![f32::NAN; n];
    swiglu_bwd(&g, &u, &r, &mut dg, &mut du);
    let fg = |g: &[f32]| {
        let mut o = vec![0f32; n];
        swiglu_fwd(g, &u, &mut o);
        weighted_sum(&o, &r)
    };
    let fu = |u: &[f32]| {
        let mut o = vec![0f32; n];
        swiglu_fwd(&g, u, &mut o);
        weighted_sum(&o, &r)
    };
    check("swiglu gate", &g, &dg, 1e-3, 2e-2, fg);
    check("swiglu up", &u, &du, 1e-3, 2e-2, fu);
}

#[test]
fn rope_backward_is_the_transpose() {
    let (seq, heads, hd) = (5, 3, 8);
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32))
        .collect();
    let neg: Vec<f32> = inv.iter().map(|x| -x).collect();
    let (x, y) = (
        randn(2 * seq * heads * hd, 7),
        randn(2 * seq * heads * hd, 8),
    );
    let mut rx = x.clone();
    rope_fwd(&mut rx, seq, heads, hd, 3, &inv);
    let mut rty = y.clone();
    rope_fwd(&mut rty, seq, heads, hd, 3, &neg);
    let (a, b) = (weighted_sum(&rx, &y), weighted_sum(&x, &rty));
    assert!(
        (a - b).abs() < 1e-4 * a.abs().max(1.0),
        "<Rx,y> = {a}, <x,R^T y> = {b}"
    );
    assert!(
        (weighted_sum(&rx, &rx) - weighted_sum(&x, &x)).abs() < 1e-3,
        "rotation keeps norms"
    );
}

#[test]
fn gemm_transposes_match_naive() {
    let (m, n, k) = (5, 7, 9);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let (a, b, init) = (randn(m * k, 10), randn(k * n, 11), randn(m * n, 12));
        let mut out = init.clone();
        gemm_fwd(&a, &b, &mut out, m, n, k, ta, tb, 0.5, true);
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for t in 0..k {
                    let av = if ta { a[t * m + i] } else { a[i * k + t] };
                    let bv = if tb { b[j * k + t] } else { b[t * n + j] };
                    s += av as f64 * bv as f64;
                }
                let want = init[i * n + j] as f64 + 0.5 * s;
                assert!(
                    (out[i * n + j] as f64 - want).abs() < 1e-4,
                    "ta={ta} tb={tb}"
                );
            }
        }
    }
}

#[test]
fn attention_backward_with_gqa_and_padding() {
    let s = AttnShape {
        batch: 2,
        q_len: 6,
        start_pos: 0,
        capacity: 6,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
    };
    let (qn, kn) = (
        s.batch * s.q_len * s.q_dim(),
        s.batch * s.q_len * s.kv_dim(),
    );
    let (q, k, v, r) = (randn(qn, 13), randn(kn, 14), randn(kn, 15), randn(qn, 16));
    let mut mask = vec![1f32; 12];
    mask[6] = 0.0; // second sequence left-padded by two
    mask[7] = 0.0;
    let fwd = |q: &[f32], k: &[f32], v: &[f32]| {
        let (mut kc, mut vc) = (vec![0f32; kn], vec![0f32; kn]);
        kv_store(k, v, &mut kc, &mut vc, s);
        let mut o = vec![0f32; qn];
        attention_fwd(q, &kc, &vc, Some(&mask), &mut o, s);
        o
    };
    let out = fwd(&q, &k, &v);
    let (mut dq, mut dk, mut dv) = (vec![f32::NAN; qn], vec![f32::NAN; kn], vec![f32::NAN; kn]);
    attention_bwd(
        &q,
        &k,
        &v,
        Some(&mask),
        &out,
        &r,
        &mut dq,
        &mut dk,
        &mut dv,
        s,
    );
    check("attention dq", &q, &dq, 1e-3, 2e-2, |x| {
        weighted_sum(&fwd(x, &k, &v), &r)
    });
    check("attention dk", &k, &dk, 1e-3, 2e-2, |x| {
        weighted_sum(&fwd(&q, x, &v), &r)
    });
    check("attention dv", &v, &dv, 1e-3, 2e-2, |x| {
        weighted_sum(&fwd(&q, &k, x), &r)
    });
    // Padded keys get no gradient.
    let kvd = s.kv_dim();
    assert!(dk[6 * kvd..8 * kvd].iter().all(|&g| g == 0.0));
}

fn tiny_cfg() -> ModelConfig {
    ModelConfig {
        arch: "qwen2".into(),
        vocab_size: 61,
        hidden_size: 32,
        intermediate_size: 48,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        rms_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: Some(RopeScaling::Linear { factor: 2.0 }),
        tie_embeddings: false,
        qkv_bias: true,
        max_position: 64,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

#[test]
fn whole_model_backward_to_lora_and_input_embeddings() {
    let cfg = tiny_cfg();
    let w = ModelWeights::random(&cfg, 17);
    let mut model = Llama::new(CpuBackend, &cfg, &w).unwrap();
    let lcfg = LoraConfig {
        rank: 3,
        alpha: 6.0,
        layers: vec![0, 1],
        modules: LoraModule::ALL.to_vec(),
    };
    let mut adapter = LoraAdapter::init(&cfg, lcfg, 2);
    let mut rng = Rng::new(3);
    for p in &mut adapter.pairs {
        p.b.iter_mut().for_each(|x| *x = rng.normal() * 0.3);
    }
    model.attach_lora(&adapter).unwrap();
    let (batch, seq, d) = (2, 5, cfg.hidden_size);
    let rows = batch * seq;
    let embeds = randn(rows * d, 4);
    let mut mask = vec![1f32; rows];
    mask[5] = 0.0; // pad at the start of sequence 2
    let capture = [0usize, 1, 2];
    let r_h: Vec<Vec<f32>> = (0..3).map(|i| randn(rows * d, 20 + i)).collect();
    let r_logits = randn(rows * cfg.vocab_size, 30);
    let loss_of = |m: &Llama<CpuBackend>, e: &[f32]| -> f64 {
        let e = e.to_vec();
        let (out, _) = m
            .forward_train(
                Input::Embeds(&e),
                batch,
                seq,
                Some(&mask),
                &capture,
                LogitsMode::All,
                true,
            )
            .unwrap();
        let mut l = weighted_sum(out.logits.as_ref().unwrap(), &r_logits);
        for (i, h) in &out.hidden {
            l += weighted_sum(h, &r_h[*i]);
        }
        l
    };
    let (_, acts) = model
        .forward_train(
            Input::Embeds(&embeds),
            batch,
            seq,
            Some(&mask),
            &capture,
            LogitsMode::All,
            true,
        )
        .unwrap();
    let mut grads = LoraGrads::new(&model).unwrap();
    let d_hidden: Vec<(usize, &Vec<f32>)> = capture.iter().map(|&i| (i, &r_h[i])).collect();
    let d_emb = model
        .backward(
            &acts,
            &d_hidden,
            Some(&r_logits),
            Some(&mask),
            Some(&mut grads),
            true,
        )
        .unwrap()
        .unwrap();

    // Input embeddings (a subset of coordinates keeps the test fast).
    let gmax = d_emb.iter().fold(0f32, |m, g| m.max(g.abs())) as f64;
    let h = 1e-2f32;
    for i in (0..embeds.len()).step_by(7) {
        let mut e = embeds.clone();
        e[i] += h;
        let fp = loss_of(&model, &e);
        e[i] -= 2.0 * h;
        let fm = loss_of(&model, &e);
        let num = (fp - fm) / (2.0 * h as f64);
        assert!(
            (num - d_emb[i] as f64).abs() < 3e-2 * gmax,
            "d embed[{i}]: numeric {num}, analytic {}",
            d_emb[i]
        );
    }
    assert!(
        d_emb[5 * d..6 * d].iter().any(|&g| g != 0.0),
        "the padded row still gets its own hidden-state gradient"
    );

    // LoRA A and B of a few modules in both layers.
    for (pi, pair) in adapter.pairs.iter().enumerate().step_by(3) {
        let (ga, gb) = grads.get(pair.layer, pair.module).unwrap();
        for (which, g) in [("A", ga), ("B", gb)] {
            let gmax = g.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
            assert!(
                gmax > 0.0,
                "layer {} {:?} {which}: zero gradient",
                pair.layer,
                pair.module
            );
            for i in (0..g.len()).step_by(11) {
                let mut ad = adapter.clone();
                let val = |ad: &mut LoraAdapter, delta: f32| {
                    let p = &mut ad.pairs[pi];
                    if which == "A" {
                        p.a[i] += delta
                    } else {
                        p.b[i] += delta
                    }
                };
                let mut m2 = Llama::new(CpuBackend, &cfg, &w).unwrap();
                val(&mut ad, h);
                m2.attach_lora(&ad).unwrap();
                let fp = loss_of(&m2, &embeds);
                val(&mut ad, -2.0 * h);
                m2.attach_lora(&ad).unwrap();
                let fm = loss_of(&m2, &embeds);
                let num = (fp - fm) / (2.0 * h as f64);
                assert!(
                    (num - g[i] as f64).abs() < 3e-2 * gmax,
                    "layer {} {:?} d{which}[{i}]: numeric {num}, analytic {}",
                    pair.layer,
                    pair.module,
                    g[i]
                );
            }
        }
    }

    // The frozen pass (LoRA skipped) differs from the tuned one and matches a model without LoRA.
    let plain = Llama::new(CpuBackend, &cfg, &w).unwrap();
    let (a, _) = plain
        .forward_train(
            Input::Embeds(&embeds),
            batch,
            seq,
            Some(&mask),
            &[2],
            LogitsMode::None,
            true,
        )
        .unwrap();
    let (b, _) = model
        .forward_train(
            Input::Embeds(&embeds),
            batch,
            seq,
            Some(&mask),
            &[2],
            LogitsMode::None,
            false,
        )
        .unwrap();
    assert_eq!(a.hidden[0].1, b.hidden[0].1);
}

/// One forward and backward with hidden-state index 1 (upstream gradient `r1`) and every
/// position's logits (`rl`) in the loss: the LoRA gradients (each pair's A then B, flattened)
/// and the input-embedding gradient.
fn lora_and_input_grads(
    model: &Llama<CpuBackend>,
    adapter: &LoraAdapter,
    (ids, batch, seq): (&[u32], usize, usize),
    mask: &Vec<f32>,
    (r1, rl): (&Vec<f32>, &Vec<f32>),
    dropout: Option<LoraDropout>,
) -> (Vec<f32>, Vec<f32>) {
    let (_, acts) = model
        .forward_train_dropout(
            Input::Ids(ids),
            batch,
            seq,
            Some(mask),
            &[1],
            LogitsMode::All,
            true,
            None,
            dropout,
        )
        .unwrap();
    assert_eq!(acts.layers.is_empty(), model.recompute);
    let mut g = LoraGrads::new(model).unwrap();
    let de = model
        .backward(&acts, &[(1, r1)], Some(rl), Some(mask), Some(&mut g), true)
        .unwrap()
        .unwrap();
    let flat: Vec<f32> = adapter
        .pairs
        .iter()
        .flat_map(|p| {
            let (a, b) = g.get(p.layer, p.module).unwrap();
            a.iter().chain(b.iter()).copied().collect::<Vec<_>>()
        })
        .collect();
    (flat, de)
}

#[test]
fn per_block_recompute_gives_the_same_gradients() {
    let cfg = tiny_cfg();
    let w = ModelWeights::random(&cfg, 31);
    let mut model = Llama::new(CpuBackend, &cfg, &w).unwrap();
    let lcfg = LoraConfig {
        rank: 3,
        alpha: 6.0,
        layers: vec![0, 1],
        modules: LoraModule::ALL.to_vec(),
    };
    let mut adapter = LoraAdapter::init(&cfg, lcfg, 2);
    let mut rng = Rng::new(9);
    for p in &mut adapter.pairs {
        p.b.iter_mut().for_each(|x| *x = rng.normal() * 0.3);
    }
    model.attach_lora(&adapter).unwrap();
    let (batch, seq, d) = (2, 6, cfg.hidden_size);
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| (i * 7 % cfg.vocab_size) as u32)
        .collect();
    let mut mask = vec![1f32; batch * seq];
    mask[6] = 0.0;
    let r1 = randn(batch * seq * d, 40);
    let rl = randn(batch * seq * cfg.vocab_size, 41);
    let run = |model: &Llama<CpuBackend>| {
        lora_and_input_grads(model, &adapter, (&ids, batch, seq), &mask, (&r1, &rl), None)
    };
    let (g_full, e_full) = run(&model);
    model.recompute = true;
    let (g_rec, e_rec) = run(&model);
    assert_eq!(
        g_full, g_rec,
        "recomputed activations must give bit-identical LoRA gradients"
    );
    assert_eq!(e_full, e_rec);
}

#[test]
fn latent_adversary_backward_to_d_b_lora_and_embeddings() {
    // A 3-block model, the adversary between blocks 1 and 2 (hidden-state index 2); captured
    // states below, at and above it, and the logits, all in the loss.
    let mut cfg = tiny_cfg();
    cfg.num_layers = 3;
    let w = ModelWeights::random(&cfg, 41);
    let mut model = Llama::new(CpuBackend, &cfg, &w).unwrap();
    let lcfg = LoraConfig {
        rank: 2,
        alpha: 4.0,
        layers: vec![0, 2],
        modules: vec![LoraModule::Q, LoraModule::Down],
    };
    let mut adapter = LoraAdapter::init(&cfg, lcfg, 5);
    let mut rng = Rng::new(6);
    for p in &mut adapter.pairs {
        p.b.iter_mut().for_each(|x| *x = rng.normal() * 0.3);
    }
    model.attach_lora(&adapter).unwrap();
    let (batch, seq, d) = (2, 4, cfg.hidden_size);
    let rows = batch * seq;
    let embeds = randn(rows * d, 7);
    let dmat: Vec<f32> = randn(d * d, 8).iter().map(|x| x * 0.05).collect();
    let bvec: Vec<f32> = randn(d, 9).iter().map(|x| x * 0.1).collect();
    let capture = [1usize, 2, 3];
    let r_h: Vec<Vec<f32>> = (0..4).map(|i| randn(rows * d, 50 + i)).collect();
    let r_logits = randn(rows * cfg.vocab_size, 60);
    let run = |e: &[f32], dm: &[f32], bv: &[f32]| {
        let hook = LatentHook::new(&CpuBackend, 2, cfg.num_layers, dm, bv).unwrap();
        let e = e.to_vec();
        model
            .forward_train_hooked(
                Input::Embeds(&e),
                batch,
                seq,
                None,
                &capture,
                LogitsMode::All,
                true,
                Some(&hook),
            )
            .unwrap()
    };
    let loss = |e: &[f32], dm: &[f32], bv: &[f32]| {
        let (out, _) = run(e, dm, bv);
        let mut l = weighted_sum(out.logits.as_ref().unwrap(), &r_logits);
        for (i, h) in &out.hidden {
            l += weighted_sum(h, &r_h[*i]);
        }
        l
    };
    // The hook changes the model: index 2 differs from the unhooked forward.
    let (plain, _) = model
        .forward_train(
            Input::Embeds(&embeds),
            batch,
            seq,
            None,
            &capture,
            LogitsMode::None,
            true,
        )
        .unwrap();
    let (hooked, acts) = run(&embeds, &dmat, &bvec);
    assert_eq!(
        plain.hidden[0].1, hooked.hidden[0].1,
        "index 1 is below the hook"
    );
    assert_ne!(
        plain.hidden[1].1, hooked.hidden[1].1,
        "index 2 carries the hook"
    );
    let mut grads = LoraGrads::new(&model)
        .unwrap()
        .with_latent(&CpuBackend, d)
        .unwrap();
    let d_hidden: Vec<(usize, &Vec<f32>)> = capture.iter().map(|&i| (i, &r_h[i])).collect();
    let d_emb = model
        .backward(
            &acts,
            &d_hidden,
            Some(&r_logits),
            None,
            Some(&mut grads),
            true,
        )
        .unwrap()
        .unwrap();
    let (gd, gb) = grads.latent.as_ref().unwrap();
    check("latent b", &bvec, gb, 1e-2, 3e-2, |b| {
        loss(&embeds, &dmat, b)
    });
    // D: every 13th entry keeps the test fast.
    let gmax = gd.iter().fold(0f32, |m, g| m.max(g.abs())) as f64;
    assert!(gmax > 0.0);
    let h = 1e-2f32;
    for i in (0..dmat.len()).step_by(13) {
        let mut dm = dmat.clone();
        dm[i] += h;
        let fp = loss(&embeds, &dm, &bvec);
        dm[i] -= 2.0 * h;
        let fm = loss(&embeds, &dm, &bvec);
        let num = (fp - fm) / (2.0 * h as f64);
        assert!(
            (num - gd[i] as f64).abs() < 3e-2 * gmax,
            "dD[{i}]: numeric {num}, analytic {}",
            gd[i]
        );
    }
    // Below the hook, gradients pass through it: input embeddings and block 0's LoRA.
    let gmax = d_emb.iter().fold(0f32, |m, g| m.max(g.abs())) as f64;
    for i in (0..embeds.len()).step_by(5) {
        let mut e = embeds.clone();
        e[i] += h;
        let fp = loss(&e, &dmat, &bvec);
        e[i] -= 2.0 * h;
        let fm = loss(&e, &dmat, &bvec);
        let num = (fp - fm) / (2.0 * h as f64);
        assert!(
            (num - d_emb[i] as f64).abs() < 3e-2 * gmax,
            "d embed[{i}]: numeric {num}, analytic {}",
            d_emb[i]
        );
    }
    // Per-block recompute gives the same gradients through the hook.
    let mut model_r = Llama::new(CpuBackend, &cfg, &w).unwrap();
    model_r.attach_lora(&adapter).unwrap();
    model_r.recompute = true;
    let hook = LatentHook::new(&CpuBackend, 2, cfg.num_layers, &dmat, &bvec).unwrap();
    let (_, acts_r) = model_r
        .forward_train_hooked(
            Input::Embeds(&embeds),
            batch,
            seq,
            None,
            &capture,
            LogitsMode::All,
            true,
            Some(&hook),
        )
        .unwrap();
    let mut grads_r = LoraGrads::new(&model_r)
        .unwrap()
        .with_latent(&CpuBackend, d)
        .unwrap();
    let d_emb_r = model_r
        .backward(
            &acts_r,
            &d_hidden,
            Some(&r_logits),
            None,
            Some(&mut grads_r),
            true,
        )
        .unwrap()
        .unwrap();
    assert_eq!(d_emb_r, d_emb);
    assert_eq!(grads_r.latent.as_ref().unwrap().0, *gd);
}

// LoRA dropout. Its masks are functions of the seed, so with the seed fixed the tuned model is
// an ordinary function of its inputs and finite differences apply.

fn dropout_model(cfg: &ModelConfig, seed: u64) -> (Llama<CpuBackend>, LoraAdapter, ModelWeights) {
    let w = ModelWeights::random(cfg, seed);
    let mut model = Llama::new(CpuBackend, cfg, &w).unwrap();
    let lcfg = LoraConfig {
        rank: 3,
        alpha: 6.0,
        layers: vec![0, 1],
        modules: LoraModule::ALL.to_vec(),
    };
    let mut adapter = LoraAdapter::init(cfg, lcfg, seed + 1);
    let mut rng = Rng::new(seed + 2);
    for p in &mut adapter.pairs {
        p.b.iter_mut().for_each(|x| *x = rng.normal() * 0.3);
    }
    model.attach_lora(&adapter).unwrap();
    (model, adapter, w)
}

#[test]
fn whole_model_backward_with_lora_dropout() {
    let cfg = tiny_cfg();
    let (model, adapter, w) = dropout_model(&cfg, 71);
    let dropout = Some(LoraDropout { p: 0.3, seed: 1234 });
    let (batch, seq, d) = (2, 5, cfg.hidden_size);
    let rows = batch * seq;
    let embeds = randn(rows * d, 72);
    let mut mask = vec![1f32; rows];
    mask[5] = 0.0;
    let capture = [0usize, 1, 2];
    let r_h: Vec<Vec<f32>> = (0..3).map(|i| randn(rows * d, 73 + i)).collect();
    let r_logits = randn(rows * cfg.vocab_size, 77);
    let forward = |m: &Llama<CpuBackend>, e: &[f32], dropout: Option<LoraDropout>| {
        let e = e.to_vec();
        m.forward_train_dropout(
            Input::Embeds(&e),
            batch,
            seq,
            Some(&mask),
            &capture,
            LogitsMode::All,
            true,
            None,
            dropout,
        )
        .unwrap()
    };
    let loss = |out: &repshield::llama::ForwardOutput<CpuBackend>| {
        let mut l = weighted_sum(out.logits.as_ref().unwrap(), &r_logits);
        for (i, h) in &out.hidden {
            l += weighted_sum(h, &r_h[*i]);
        }
        l
    };
    let loss_of = |m: &Llama<CpuBackend>, e: &[f32]| loss(&forward(m, e, dropout).0);
    let grads_of = |m: &Llama<CpuBackend>, dropout: Option<LoraDropout>| {
        let (_, acts) = forward(m, &embeds, dropout);
        let mut grads = LoraGrads::new(m).unwrap();
        let d_hidden: Vec<(usize, &Vec<f32>)> = capture.iter().map(|&i| (i, &r_h[i])).collect();
        let d_emb = m
            .backward(
                &acts,
                &d_hidden,
                Some(&r_logits),
                Some(&mask),
                Some(&mut grads),
                true,
            )
            .unwrap()
            .unwrap();
        (grads, d_emb)
    };
    // The masks are really applied: the tuned model and its gradients move.
    assert_ne!(
        loss_of(&model, &embeds),
        loss(&forward(&model, &embeds, None).0)
    );
    let (grads, d_emb) = grads_of(&model, dropout);
    let (grads_off, d_emb_off) = grads_of(&model, None);
    assert_ne!(d_emb, d_emb_off);

    let h = 1e-2f32;
    let gmax = d_emb.iter().fold(0f32, |m, g| m.max(g.abs())) as f64;
    for i in (0..embeds.len()).step_by(7) {
        let mut e = embeds.clone();
        e[i] += h;
        let fp = loss_of(&model, &e);
        e[i] -= 2.0 * h;
        let fm = loss_of(&model, &e);
        let num = (fp - fm) / (2.0 * h as f64);
        assert!(
            (num - d_emb[i] as f64).abs() < 3e-2 * gmax,
            "d embed[{i}]: numeric {num}, analytic {}",
            d_emb[i]
        );
    }

    // A and B of every module of both layers: each has a mask of its own.
    for (pi, pair) in adapter.pairs.iter().enumerate() {
        let (ga, gb) = grads.get(pair.layer, pair.module).unwrap();
        let (ga_off, _) = grads_off.get(pair.layer, pair.module).unwrap();
        assert_ne!(
            ga, ga_off,
            "layer {} {:?}: dA ignores the mask",
            pair.layer, pair.module
        );
        for (which, g) in [("A", ga), ("B", gb)] {
            let gmax = g.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
            assert!(
                gmax > 0.0,
                "layer {} {:?} {which}: zero gradient",
                pair.layer,
                pair.module
            );
            for i in (0..g.len()).step_by(13) {
                let eval = |delta: f32| {
                    let mut ad = adapter.clone();
                    if which == "A" {
                        ad.pairs[pi].a[i] += delta;
                    } else {
                        ad.pairs[pi].b[i] += delta;
                    }
                    let mut m2 = Llama::new(CpuBackend, &cfg, &w).unwrap();
                    m2.attach_lora(&ad).unwrap();
                    loss_of(&m2, &embeds)
                };
                let num = (eval(h) - eval(-h)) / (2.0 * h as f64);
                assert!(
                    (num - g[i] as f64).abs() < 3e-2 * gmax,
                    "layer {} {:?} d{which}[{i}]: numeric {num}, analytic {}",
                    pair.layer,
                    pair.module,
                    g[i]
                );
            }
        }
    }

    // The frozen pass ignores dropout.
    let frozen = |dropout| {
        let e = embeds.clone();
        model
            .forward_train_dropout(
                Input::Embeds(&e),
                batch,
                seq,
                Some(&mask),
                &[2],
                LogitsMode::None,
                false,
                None,
                dropout,
            )
            .unwrap()
            .0
            .hidden
    };
    assert_eq!(frozen(dropout)[0].1, frozen(None)[0].1);
}

#[test]
fn per_block_recompute_regenerates_the_dropout_masks() {
    let cfg = tiny_cfg();
    let (mut model, adapter, _) = dropout_model(&cfg, 81);
    let (batch, seq, d) = (2, 6, cfg.hidden_size);
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| (i * 5 % cfg.vocab_size) as u32)
        .collect();
    let mask = vec![1f32; batch * seq];
    let r1 = randn(batch * seq * d, 82);
    let rl = randn(batch * seq * cfg.vocab_size, 83);
    let run = |model: &Llama<CpuBackend>, dropout: Option<LoraDropout>| {
        lora_and_input_grads(
            model,
            &adapter,
            (&ids, batch, seq),
            &mask,
            (&r1, &rl),
            dropout,
        )
    };
    // Gradients (LoRA, then input) that differ bit-wise, counted: the vectors are too long to print.
    let differ = |a: &(Vec<f32>, Vec<f32>), b: &(Vec<f32>, Vec<f32>)| {
        let count = |x: &[f32], y: &[f32]| {
            x.iter()
                .zip(y)
                .filter(|(u, v)| u.to_bits() != v.to_bits())
                .count()
        };
        (count(&a.0, &b.0), count(&a.1, &b.1))
    };
    let dropout = Some(LoraDropout::for_micro_batch(0.05, 42, 3, 1));
    let full = run(&model, dropout);
    assert_eq!(
        differ(&full, &run(&model, dropout)),
        (0, 0),
        "the same seed must draw the same masks"
    );
    assert_ne!(
        differ(&full, &run(&model, None)).0,
        0,
        "dropout must change the gradients"
    );
    let other_step = run(&model, Some(LoraDropout::for_micro_batch(0.05, 42, 4, 1)));
    assert_ne!(
        differ(&full, &other_step).0,
        0,
        "another step draws other masks"
    );
    model.recompute = true;
    assert_eq!(
        differ(&full, &run(&model, dropout)),
        (0, 0),
        "recomputed blocks must regenerate the masks bit for bit"
    );
}

/// The dropout op itself over a large tensor: the dropped fraction is `p` within 5 binomial
/// standard deviations, kept elements are scaled by exactly `1 / (1 - p)`, the same seed gives
/// the same mask, and masks derived for other modules, layers, steps, micro-batches and passes
/// are independent (they agree on a fraction `p^2 + (1-p)^2` of elements, within 5 standard
/// deviations; a shared or shifted mask would agree far more, or less).
#[test]
fn dropout_masks_have_rate_p_and_independent_streams() {
    use repshield::backend::dropout_mask::keep;
    use repshield::backend::Backend;
    let n = 1 << 20;
    let x: Vec<f32> = randn(n, 90).iter().map(|v| v + 0.5).collect();
    assert!(x.iter().all(|&v| v != 0.0));
    let drop = |p: f32, seed: u64| {
        let mut out = vec![f32::NAN; n];
        CpuBackend.dropout(&x, &mut out, p, seed);
        out
    };
    for p in [0.05f32, 0.3, 0.5] {
        let out = drop(p, 7);
        let scale = (1.0 / (1.0 - p as f64)) as f32;
        let mut dropped = 0usize;
        for (i, (&o, &xi)) in out.iter().zip(&x).enumerate() {
            if o == 0.0 {
                dropped += 1;
                assert!(!keep(7, i as u64, (p as f64 * 16777216.0).round() as u32));
            } else {
                assert_eq!(o, xi * scale, "element {i}");
            }
        }
        let (nf, pf) = (n as f64, p as f64);
        let sd = (nf * pf * (1.0 - pf)).sqrt();
        assert!(
            (dropped as f64 - nf * pf).abs() < 5.0 * sd,
            "p {p}: {dropped} of {n} dropped, expected {} +- {sd}",
            nf * pf
        );
        assert_eq!(
            out,
            drop(p, 7),
            "p {p}: the same seed must give the same mask"
        );
    }
    assert_eq!(drop(0.0, 7), x, "p = 0 keeps everything unscaled");

    let p = 0.5f32;
    let agreement = |a: u64, b: u64| {
        let (ma, mb) = (drop(p, a), drop(p, b));
        let same = ma
            .iter()
            .zip(&mb)
            .filter(|(u, v)| (**u == 0.0) == (**v == 0.0))
            .count();
        same as f64 / n as f64
    };
    let base = LoraDropout::for_micro_batch(p, 42, 10, 0);
    let others = [
        ("another step", LoraDropout::for_micro_batch(p, 42, 11, 0)),
        (
            "another micro-batch",
            LoraDropout::for_micro_batch(p, 42, 10, 1),
        ),
        (
            "another run seed",
            LoraDropout::for_micro_batch(p, 43, 10, 0),
        ),
        ("another pass", base.stream(1)),
    ];
    let sd = (0.25 / n as f64).sqrt();
    for (what, o) in others {
        let a = agreement(base.seed, o.seed);
        assert!(
            (a - 0.5).abs() < 5.0 * sd,
            "{what}: masks agree on {a} of elements"
        );
    }
    let modules = [
        (
            "K vs Q",
            base.module(0, LoraModule::Q),
            base.module(0, LoraModule::K),
        ),
        (
            "layer 1 vs 0",
            base.module(0, LoraModule::Q),
            base.module(1, LoraModule::Q),
        ),
        (
            "gate vs up",
            base.module(3, LoraModule::Gate),
            base.module(3, LoraModule::Up),
        ),
    ];
    for (what, a, b) in modules {
        let f = agreement(a.seed, b.seed);
        assert!(
            (f - 0.5).abs() < 5.0 * sd,
            "{what}: masks agree on {f} of elements"
        );
    }
}
