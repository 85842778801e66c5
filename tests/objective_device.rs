//! The triplet objective as the trainer runs it (`triplet_loss_on`: device row statistics and
//! row combinations, hinges on the host) against the f64 reference `triplet_loss`, on the CPU
//! backend. tests/cuda_parity.rs runs the same comparison on the GPU.

use repshield::backend::cpu::CpuBackend;
use repshield::objectives::triplet::{triplet_loss, triplet_loss_on, DeviceReps, TripletConfig};
use repshield::objectives::{Distance, Reps};
use repshield::util::Rng;

fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal() * scale).collect()
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den.max(1e-300)).sqrt()
}

#[test]
fn device_triplet_matches_the_reference_for_every_distance() {
    let be = CpuBackend;
    let (batch, seq, d) = (2usize, 5usize, 24usize);
    let rows = batch * seq;
    let all = [0usize, 1, 2, 3];
    let targets = [2usize, 3];
    let slab = rows * d;
    // Tuned = original + a small perturbation at some indices (the situation in training), and
    // one index where they are equal (L2 at exactly 0).
    let bo = randn(all.len() * slab, 1, 1.0);
    let mut bt = bo.clone();
    for (i, x) in randn(all.len() * slab, 2, 0.1).iter().enumerate() {
        if i >= slab {
            bt[i] += x;
        }
    }
    let ht = randn(all.len() * slab, 3, 1.0);
    let ho_full = randn(all.len() * slab, 4, 1.0);
    let ho: Vec<f32> = targets
        .iter()
        .flat_map(|&l| ho_full[l * slab..(l + 1) * slab].to_vec())
        .collect();
    let bm = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0];
    let hm = [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0];
    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let (bt64, bo64, ht64, ho64) = (f64s(&bt), f64s(&bo), f64s(&ht), f64s(&ho));
    let (btb, bob, htb, hob) = (
        slabs(&bt, &all, slab),
        slabs(&bo, &all, slab),
        slabs(&ht, &all, slab),
        slabs(&ho, &targets, slab),
    );
    let (mut combos, mut active) = (0, 0);
    for bp in [Distance::L2, Distance::Cos, Distance::L2sqn, Distance::Mix] {
        for (bn, hp, hn) in [
            (Distance::Cos, Distance::Cos, Distance::Cos),
            (Distance::Mix, Distance::L2, Distance::L2sqn),
            (Distance::L2, Distance::Mix, Distance::L2),
            (Distance::L2sqn, Distance::L2sqn, Distance::Mix),
        ] {
            // Small margins leave some hinges off, wide ones turn every hinge on.
            for (mb, mh) in [(0.5, 0.4), (30.0, 30.0)] {
                let cfg = TripletConfig {
                    benign_pos: bp,
                    benign_neg: bn,
                    harmful_pos: hp,
                    harmful_neg: hn,
                    margin_benign: mb,
                    margin_harmful: mh,
                    ..Default::default()
                };
                let (want, wg) = triplet_loss(
                    &cfg,
                    Reps::new(&bt64, &all, batch, seq, d),
                    Reps::new(&bo64, &all, batch, seq, d),
                    &bm,
                    Reps::new(&ht64, &all, batch, seq, d),
                    Reps::new(&ho64, &targets, batch, seq, d),
                    &hm,
                    &targets,
                    true,
                );
                let wg = wg.unwrap();
                let (got, gg) = triplet_loss_on(
                    &be,
                    &cfg,
                    d,
                    &all,
                    &dreps(&btb, rows),
                    &dreps(&bob, rows),
                    &bm,
                    &dreps(&htb, rows),
                    &dreps(&hob, rows),
                    &hm,
                    &targets,
                    true,
                )
                .unwrap();
                let gg = gg.unwrap();
                let what = format!("{bp:?}/{bn:?}/{hp:?}/{hn:?} margins {mb}/{mh}");
                for (name, g, w) in [
                    ("benign", got.benign, want.benign),
                    ("harmful", got.harmful, want.harmful),
                    ("total", got.total, want.total),
                ] {
                    assert!(
                        (g - w).abs() <= 1e-6 * (1.0 + w.abs()),
                        "{what} {name}: {g} vs {w}"
                    );
                }
                if want.benign > 0.0 && want.harmful > 0.0 {
                    active += 1;
                }
                grads_match(
                    &format!("{what} benign"),
                    &gg.benign,
                    &wg.benign,
                    &all,
                    slab,
                );
                grads_match(
                    &format!("{what} harmful"),
                    &gg.harmful,
                    &wg.harmful,
                    &all,
                    slab,
                );
                combos += 1;
            }
        }
    }
    assert_eq!(combos, 32);
    assert!(
        active >= 16,
        "only {active} of 32 runs have both terms active"
    );
}

fn slabs(v: &[f32], idx: &[usize], slab: usize) -> Vec<(usize, Vec<f32>)> {
    idx.iter()
        .enumerate()
        .map(|(k, &l)| (l, v[k * slab..(k + 1) * slab].to_vec()))
        .collect()
}

fn dreps(v: &[(usize, Vec<f32>)], rows: usize) -> DeviceReps<'_, CpuBackend> {
    DeviceReps {
        bufs: v.iter().map(|(l, b)| (*l, b)).collect(),
        rows,
    }
}

fn grads_match(what: &str, got: &[(usize, Vec<f32>)], want: &[f64], idx: &[usize], slab: usize) {
    for (k, &l) in idx.iter().enumerate() {
        let (_, g) = got.iter().find(|g| g.0 == l).unwrap();
        let e = rel_l2(g, &want[k * slab..(k + 1) * slab]);
        assert!(e < 1e-5, "{what} gradient at {l}: rel L2 {e}");
    }
}

/// RepBend and Circuit Breakers as training runs them, against their f64 references.
#[test]
fn device_repbend_and_circuit_breakers_match_the_references() {
    use repshield::objectives::circuit_breaker::{
        circuit_breaker_loss, circuit_breaker_loss_on, CircuitBreakerConfig,
    };
    use repshield::objectives::repbend::{repbend_loss, repbend_loss_on, RepBendConfig};
    let be = CpuBackend;
    let (batch, seq, d) = (3usize, 5usize, 20usize);
    let rows = batch * seq;
    let slab = rows * d;
    let all = [0usize, 1, 2, 3];
    let targets = [2usize, 3];
    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let st = randn(all.len() * slab, 11, 1.0);
    // Index 0 unchanged by the adapter: the L2 distances at exactly 0.
    let so: Vec<f32> = st
        .iter()
        .zip(randn(all.len() * slab, 12, 0.3))
        .enumerate()
        .map(|(i, (a, b))| if i < slab { *a } else { a + b })
        .collect();
    let ut = randn(targets.len() * slab, 13, 1.0);
    // Some original rows anti-aligned with the tuned ones: relu(cos) off there.
    let uo: Vec<f32> = ut
        .iter()
        .zip(randn(targets.len() * slab, 14, 1.0))
        .enumerate()
        .map(|(i, (a, b))| {
            if (i / d) % 3 == 0 {
                -a + 0.1 * b
            } else {
                a + b
            }
        })
        .collect();
    let sm: Vec<f64> = (0..rows).map(|r| (r % 4 != 1) as u8 as f64).collect();
    let um: Vec<f64> = (0..rows).map(|r| (r % 5 != 0) as u8 as f64).collect();
    let last = [1usize, 3, 4];
    let (stb, sob, utb, uob) = (
        slabs(&st, &all, slab),
        slabs(&so, &all, slab),
        slabs(&ut, &targets, slab),
        slabs(&uo, &targets, slab),
    );

    let rb = RepBendConfig::default();
    let (want, wg) = repbend_loss(
        &rb,
        Reps::new(&f64s(&st), &all, batch, seq, d),
        Reps::new(&f64s(&so), &all, batch, seq, d),
        &sm,
        Reps::new(&f64s(&ut), &targets, batch, seq, d),
        Reps::new(&f64s(&uo), &targets, batch, seq, d),
        &um,
        &last,
        &targets,
        true,
    );
    let wg = wg.unwrap();
    let (got, gg) = repbend_loss_on(
        &be,
        &rb,
        d,
        &all,
        &dreps(&stb, rows),
        &dreps(&sob, rows),
        &sm,
        &dreps(&utb, rows),
        &dreps(&uob, rows),
        &um,
        seq,
        &last,
        &targets,
        true,
    )
    .unwrap();
    let (gs, gu) = gg.unwrap();
    for (name, g, w) in [
        ("safe_dist", got.safe_dist, want.safe_dist),
        ("unsafe_dist", got.unsafe_dist, want.unsafe_dist),
        ("unsafe_cos", got.unsafe_cos, want.unsafe_cos),
        ("total", got.total, want.total),
    ] {
        assert!(w != 0.0, "repbend {name} is 0");
        assert!(
            (g - w).abs() <= 1e-6 * (1.0 + w.abs()),
            "repbend {name}: {g} vs {w}"
        );
    }
    grads_match("repbend safe", &gs, &wg.safe, &all, slab);
    grads_match("repbend unsafe", &gu, &wg.unsafe_, &targets, slab);

    for (step, masked) in [(0usize, false), (7, true)] {
        let cb = CircuitBreakerConfig {
            alpha: 10.0,
            retain_masked_mean: masked,
        };
        let (want, wg) = circuit_breaker_loss(
            &cb,
            step,
            20,
            Reps::new(&f64s(&st), &all, batch, seq, d),
            Reps::new(&f64s(&so), &all, batch, seq, d),
            &sm,
            Reps::new(&f64s(&ut), &targets, batch, seq, d),
            Reps::new(&f64s(&uo), &targets, batch, seq, d),
            &um,
            &targets,
            true,
        );
        let wg = wg.unwrap();
        let (got, gg) = circuit_breaker_loss_on(
            &be,
            &cb,
            step,
            20,
            d,
            &all,
            &dreps(&stb, rows),
            &dreps(&sob, rows),
            &sm,
            &dreps(&utb, rows),
            &dreps(&uob, rows),
            &um,
            &targets,
            true,
        )
        .unwrap();
        let (gr, gc) = gg.unwrap();
        for (name, g, w) in [
            ("retain", got.retain, want.retain),
            ("cb", got.cb, want.cb),
            ("total", got.total, want.total),
        ] {
            assert!(w != 0.0, "cb {name} is 0");
            assert!(
                (g - w).abs() <= 1e-6 * (1.0 + w.abs()),
                "cb step {step} {name}: {g} vs {w}"
            );
        }
        if step > 0 {
            // c_retain = 0 at step 0: the retain gradient is exactly zero there.
            grads_match("cb retain", &gr, &wg.retain, &all, slab);
        }
        grads_match("cb", &gc, &wg.cb, &targets, slab);
    }
}
