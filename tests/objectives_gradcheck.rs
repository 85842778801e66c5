//! Every objective's gradient against central finite differences (f64), and values against
//! hand-computed cases.

use repshield::objectives::circuit_breaker::{
    circuit_breaker_loss, coefficients, CircuitBreakerConfig,
};
use repshield::objectives::kl::kl_retain;
use repshield::objectives::repbend::{repbend_loss, RepBendConfig};
use repshield::objectives::triplet::{triplet_loss, TripletConfig};
use repshield::objectives::{Distance, Reps};
use repshield::util::Rng;

const H: f64 = 1e-6;

fn randn(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal() as f64 * scale).collect()
}

/// Central differences of `f` with respect to every element of `x`, compared with `grad`.
fn check_grad(name: &str, x: &[f64], grad: &[f64], f: impl Fn(&[f64]) -> f64) {
    let mut worst = 0.0f64;
    let gmax = grad.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    assert!(gmax > 0.0, "{name}: gradient is all zero");
    let mut xp = x.to_vec();
    for i in 0..x.len() {
        xp[i] = x[i] + H;
        let fp = f(&xp);
        xp[i] = x[i] - H;
        let fm = f(&xp);
        xp[i] = x[i];
        let num = (fp - fm) / (2.0 * H);
        worst = worst.max((num - grad[i]).abs() / gmax);
    }
    assert!(
        worst < 1e-6,
        "{name}: max |numeric - analytic| / max|grad| = {worst}"
    );
}

const B: usize = 2;
const T: usize = 3;
const D: usize = 5;

fn mask() -> Vec<f64> {
    vec![1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
}

#[test]
fn triplet_gradients_all_distance_combinations() {
    let idx = [0usize, 1, 2];
    let targets = [1usize, 2];
    let n = idx.len() * B * T * D;
    let (bt, bo, ht, ho) = (
        randn(n, 1, 1.0),
        randn(n, 2, 1.0),
        randn(n, 3, 1.0),
        randn(n, 4, 1.0),
    );
    let (bm, hm) = (mask(), vec![1.0, 0.0, 1.0, 1.0, 1.0, 0.0]);
    for (bp, bn, hp, hn) in [
        (Distance::L2, Distance::Cos, Distance::Cos, Distance::Cos),
        (
            Distance::L2sqn,
            Distance::Mix,
            Distance::L2,
            Distance::L2sqn,
        ),
        (Distance::Mix, Distance::L2, Distance::Mix, Distance::L2),
    ] {
        // Wide margins keep every hinge active for the non-default combinations (a hinge at
        // exactly zero has no derivative to check).
        let wide = bp != Distance::L2;
        let cfg = TripletConfig {
            benign_pos: bp,
            benign_neg: bn,
            harmful_pos: hp,
            harmful_neg: hn,
            margin_benign: if wide { 30.0 } else { 2.0 },
            margin_harmful: if wide { 30.0 } else { 3.0 },
            ..Default::default()
        };
        let loss = |bt: &[f64], ht: &[f64]| {
            triplet_loss(
                &cfg,
                Reps::new(bt, &idx, B, T, D),
                Reps::new(&bo, &idx, B, T, D),
                &bm,
                Reps::new(ht, &idx, B, T, D),
                Reps::new(&ho, &idx, B, T, D),
                &hm,
                &targets,
                false,
            )
            .0
            .total
        };
        let (terms, g) = triplet_loss(
            &cfg,
            Reps::new(&bt, &idx, B, T, D),
            Reps::new(&bo, &idx, B, T, D),
            &bm,
            Reps::new(&ht, &idx, B, T, D),
            Reps::new(&ho, &idx, B, T, D),
            &hm,
            &targets,
            true,
        );
        let g = g.unwrap();
        assert!(
            terms.benign > 0.0 && terms.harmful > 0.0,
            "{bp:?}/{bn:?}/{hp:?}/{hn:?}: {terms:?}"
        );
        check_grad(
            &format!("triplet {bp:?}/{bn:?} benign"),
            &bt,
            &g.benign,
            |x| loss(x, &ht),
        );
        check_grad(
            &format!("triplet {hp:?}/{hn:?} harmful (incl. mu)"),
            &ht,
            &g.harmful,
            |x| loss(&bt, x),
        );
    }
}

#[test]
fn triplet_value_on_a_hand_computed_case() {
    // One index, one benign token, one harmful token, D = 2.
    let idx = [0usize];
    let bt = [3.0, 4.0];
    let bo = [0.0, 0.0];
    let ht = [1.0, 0.0];
    let ho = [0.0, 1.0];
    let (terms, _) = triplet_loss(
        &TripletConfig::default(),
        Reps::new(&bt, &idx, 1, 1, 2),
        Reps::new(&bo, &idx, 1, 1, 2),
        &[1.0],
        Reps::new(&ht, &idx, 1, 1, 2),
        Reps::new(&ho, &idx, 1, 1, 2),
        &[1.0],
        &[0],
        false,
    );
    // mu = (1, 0). benign: l2((3,4),(0,0)) = 5; cos dist((3,4),(1,0)) = 1 - 0.6 = 0.4;
    // relu(5 - 0.4 + 2) = 6.6. harmful: cos dist(h', mu) = 0; cos dist((1,0),(0,1)) = 1;
    // relu(0 - 1 + 3) = 2. total = 0.5 * 6.6 + 0.6 * 2 = 4.5.
    assert!((terms.benign - 6.6).abs() < 1e-12, "{}", terms.benign);
    assert!((terms.harmful - 2.0).abs() < 1e-12);
    assert!((terms.total - 4.5).abs() < 1e-12);
}

#[test]
fn kl_value_and_gradient() {
    let (rows, v, batch) = (6, 7, 2);
    let orig: Vec<f32> = randn(rows * v, 5, 2.0).iter().map(|&x| x as f32).collect();
    let tuned: Vec<f32> = randn(rows * v, 6, 2.0).iter().map(|&x| x as f32).collect();
    let m = mask();
    // Identical logits: zero.
    assert_eq!(kl_retain(&orig, &orig, &m, batch, v, 2.0, 1.0, None), 0.0);
    // Naive reference value.
    let t = 2.0f64;
    let mut want = 0.0;
    for r in 0..rows {
        if m[r] == 0.0 {
            continue;
        }
        let p: Vec<f64> = {
            let e: Vec<f64> = orig[r * v..(r + 1) * v]
                .iter()
                .map(|&x| (x as f64 / t).exp())
                .collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|x| x / s).collect()
        };
        let q: Vec<f64> = {
            let e: Vec<f64> = tuned[r * v..(r + 1) * v]
                .iter()
                .map(|&x| (x as f64 / t).exp())
                .collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|x| x / s).collect()
        };
        want += p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum::<f64>();
    }
    want *= t * t / batch as f64;
    let mut grad = vec![f32::NAN; rows * v];
    let got = kl_retain(&orig, &tuned, &m, batch, v, 2.0, 0.7, Some(&mut grad));
    assert!(
        (got - 0.7 * want).abs() < 1e-9 * want.abs(),
        "{got} vs {}",
        0.7 * want
    );
    // Gradient by finite differences in f64 through an f32 input: use a coarser step.
    let gmax = grad.iter().fold(0f32, |a, g| a.max(g.abs()));
    for i in 0..rows * v {
        let mut tp = tuned.clone();
        let h = 1e-2f32;
        tp[i] += h;
        let fp = kl_retain(&orig, &tp, &m, batch, v, 2.0, 0.7, None);
        tp[i] -= 2.0 * h;
        let fm = kl_retain(&orig, &tp, &m, batch, v, 2.0, 0.7, None);
        let num = (fp - fm) / (2.0 * h as f64);
        assert!(
            (num - grad[i] as f64).abs() < 2e-4 * gmax as f64,
            "kl grad {i}: {num} vs {}",
            grad[i]
        );
    }
    assert!(
        grad[2 * v..3 * v].iter().all(|&g| g == 0.0),
        "masked rows get zero gradient"
    );
}

#[test]
fn repbend_gradients() {
    let idx = [0usize, 1, 2];
    let targets = [1usize, 2];
    let n = idx.len() * B * T * D;
    let (st, so, ut, uo) = (
        randn(n, 7, 1.0),
        randn(n, 8, 1.0),
        randn(n, 9, 1.0),
        randn(n, 10, 1.0),
    );
    let (sm, um) = (mask(), vec![0.0, 1.0, 1.0, 0.0, 1.0, 1.0]);
    let last = [0usize, 2];
    let cfg = RepBendConfig::default();
    let loss = |st: &[f64], ut: &[f64]| {
        repbend_loss(
            &cfg,
            Reps::new(st, &idx, B, T, D),
            Reps::new(&so, &idx, B, T, D),
            &sm,
            Reps::new(ut, &idx, B, T, D),
            Reps::new(&uo, &idx, B, T, D),
            &um,
            &last,
            &targets,
            false,
        )
        .0
        .total
    };
    let (terms, g) = repbend_loss(
        &cfg,
        Reps::new(&st, &idx, B, T, D),
        Reps::new(&so, &idx, B, T, D),
        &sm,
        Reps::new(&ut, &idx, B, T, D),
        Reps::new(&uo, &idx, B, T, D),
        &um,
        &last,
        &targets,
        true,
    );
    assert!(terms.safe_dist > 0.0 && terms.unsafe_dist > 0.0 && terms.unsafe_cos > 0.0);
    let g = g.unwrap();
    check_grad("repbend safe", &st, &g.safe, |x| loss(x, &ut));
    check_grad("repbend unsafe", &ut, &g.unsafe_, |x| loss(&st, x));
}

#[test]
fn circuit_breaker_gradients_and_schedule() {
    assert_eq!(coefficients(10.0, 0, 150), (0.0, 10.0));
    assert_eq!(coefficients(10.0, 75, 150), (2.5, 7.5));
    let idx = [0usize, 1, 2];
    let targets = [1usize, 2];
    let n = idx.len() * B * T * D;
    let (rt, ro, ct, co) = (
        randn(n, 11, 1.0),
        randn(n, 12, 1.0),
        randn(n, 13, 1.0),
        randn(n, 14, 1.0),
    );
    // Make some cb cosines positive so the relu passes.
    let ct: Vec<f64> = ct.iter().zip(&co).map(|(a, b)| a + 1.5 * b).collect();
    let (rm, cm) = (mask(), vec![1.0, 1.0, 1.0, 0.0, 1.0, 1.0]);
    for masked_mean in [false, true] {
        let cfg = CircuitBreakerConfig {
            alpha: 10.0,
            retain_masked_mean: masked_mean,
        };
        let loss = |rt: &[f64], ct: &[f64]| {
            circuit_breaker_loss(
                &cfg,
                30,
                100,
                Reps::new(rt, &idx, B, T, D),
                Reps::new(&ro, &idx, B, T, D),
                &rm,
                Reps::new(ct, &idx, B, T, D),
                Reps::new(&co, &idx, B, T, D),
                &cm,
                &targets,
                false,
            )
            .0
            .total
        };
        let (terms, g) = circuit_breaker_loss(
            &cfg,
            30,
            100,
            Reps::new(&rt, &idx, B, T, D),
            Reps::new(&ro, &idx, B, T, D),
            &rm,
            Reps::new(&ct, &idx, B, T, D),
            Reps::new(&co, &idx, B, T, D),
            &cm,
            &targets,
            true,
        );
        assert!((terms.c_retain - 1.5).abs() < 1e-12 && (terms.c_cb - 8.5).abs() < 1e-12);
        assert!(terms.retain > 0.0 && terms.cb > 0.0);
        let g = g.unwrap();
        check_grad("cb retain", &rt, &g.retain, |x| loss(x, &ct));
        check_grad("cb reroute", &ct, &g.cb, |x| loss(&rt, x));
    }
    // Padding convention: the default divides by every position, the option by masked ones.
    let default = circuit_breaker_loss(
        &CircuitBreakerConfig::default(),
        0,
        10,
        Reps::new(&rt, &idx, B, T, D),
        Reps::new(&ro, &idx, B, T, D),
        &rm,
        Reps::new(&ct, &idx, B, T, D),
        Reps::new(&co, &idx, B, T, D),
        &cm,
        &targets,
        false,
    )
    .0;
    let masked = circuit_breaker_loss(
        &CircuitBreakerConfig {
            retain_masked_mean: true,
            ..Default::default()
        },
        0,
        10,
        Reps::new(&rt, &idx, B, T, D),
        Reps::new(&ro, &idx, B, T, D),
        &rm,
        Reps::new(&ct, &idx, B, T, D),
        Reps::new(&co, &idx, B, T, D),
        &cm,
        &targets,
        false,
    )
    .0;
    assert!((default.retain * 6.0 / 4.0 - masked.retain).abs() < 1e-12);
}
