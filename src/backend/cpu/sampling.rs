//! Token selection, the CPU twin of kernels/sampling.cu: greedy argmax and top-p (nucleus)
//! sampling. Top-p is defined so that one GPU block per row can compute it without sorting
//! the vocabulary (see [`sample_top_p`]); `Backend::argmax_rows` and
//! `Backend::sample_top_p_rows` default to these functions row by row.

/// Index of the largest value (the first one on ties, like `torch.argmax`); NaN never wins, and
/// a row of only NaN gives 0.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in row.iter().enumerate() {
        if !v.is_nan() && best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}

use std::f32::consts::LOG2_E;

/// ln 2 split so that `k * LN2_HI` is exact for |k| <= 128 (Cody-Waite).
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// `e^x` for `x <= 0`, 0 below -87 (where `e^x` nears the smallest normal f32) and for NaN.
/// Built from single IEEE-rounded f32 operations only (no FMA, no libm) so that the kernel's
/// `exp_nonpos`, written with `__fmul_rn` / `__fadd_rn`, gives the same bits: CUDA's `expf`
/// and the host's differ in the last bits, and that would move the draw's cumulative
/// boundaries by ~1e-7 relative. Accurate to about 2 ulp, which sampling does not notice.
pub fn exp_nonpos(x: f32) -> f32 {
    if x.is_nan() || x < -87.0 {
        return 0.0;
    }
    // x = k ln2 + r with |r| <= ln2 / 2, k in [-126, 0].
    let k = (x * LOG2_E + 0.5).floor();
    let r = x - k * LN2_HI - k * LN2_LO;
    // Taylor to degree 7: the remainder is below 6e-9 on |r| <= ln2 / 2.
    let mut q = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        q = q * r + c;
    }
    q * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

/// The nucleus of one row: every token's unnormalised probability and the threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Nucleus {
    /// `p_i = exp_nonpos((l_i - max) / temperature)`: 1 at the maximum, 0 for NaN and -inf.
    pub probs: Vec<f32>,
    /// `t*`: token i is kept iff `probs[i] >= threshold` (always > 0).
    pub threshold: f32,
    /// `kept_mass(probs, threshold)`: what the draw scales the uniform by.
    pub mass: f64,
}

/// `sum_{p_i >= t} p_i` in f64, in index order.
pub fn kept_mass(probs: &[f32], t: f32) -> f64 {
    probs.iter().filter(|&&p| p >= t).map(|&p| p as f64).sum()
}

/// The nucleus of `row` at `temperature` and `top_p` (see [`sample_top_p`]), or `None` where
/// the token is the row's argmax: `temperature <= 0` (or NaN), or no finite maximum (a row of
/// only -inf/NaN, or a +inf).
pub fn nucleus(row: &[f32], temperature: f32, top_p: f32) -> Option<Nucleus> {
    let max = row
        .iter()
        .copied()
        .filter(|v| !v.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    if temperature.is_nan() || temperature <= 0.0 || !max.is_finite() {
        return None;
    }
    let probs: Vec<f32> = row
        .iter()
        .map(|&l| exp_nonpos((l - max) / temperature))
        .collect();
    // NaN top_p acts as 0, like a top_p below 0.
    let top_p = if top_p >= 1.0 {
        1.0
    } else if top_p > 0.0 {
        top_p
    } else {
        0.0
    };
    let target = kept_mass(&probs, 0.0) * top_p as f64;
    // The largest t in [0, 1] with kept_mass(t) >= target. kept_mass is monotone in t and
    // non-negative floats order like their bit patterns, so bisection over the bits finds it
    // exactly (30 steps); lo always qualifies (t = 0 keeps everything, and target <= total).
    let (mut lo, mut hi) = (0u32, 1.0f32.to_bits() + 1);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if kept_mass(&probs, f32::from_bits(mid)) >= target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let threshold = f32::from_bits(lo);
    let mass = kept_mass(&probs, threshold);
    Some(Nucleus {
        probs,
        threshold,
        mass,
    })
}

/// Top-p (nucleus) sampling of one row of logits with the uniform `u` in [0, 1).
///
/// Definition (kernels/sampling.cu computes exactly this, without a sort):
/// - `temperature <= 0` (or NaN): the argmax (first index on ties). A row with no finite
///   maximum (only -inf/NaN, or a +inf) also gives its argmax: 0 for a row of -inf/NaN.
/// - `p_i = exp_nonpos((l_i - max) / temperature)`; NaN and -inf logits get `p_i = 0` and are
///   never drawn.
/// - The nucleus is `{i : p_i >= t*}`, where `t*` is the largest threshold whose kept mass
///   `sum_{p_i >= t} p_i` reaches `top_p * sum_i p_i` (`top_p` clamped to [0, 1], NaN as 0;
///   sums in f64). Tokens tied with the boundary probability are all kept, so the nucleus can
///   be larger than the smallest prefix of a stable sort by probability; `top_p = 0` keeps the
///   tokens tied with the maximum, `top_p = 1` every token with `p_i > 0`.
/// - The draw: walking the kept tokens in index order, the first whose cumulative mass (f64)
///   exceeds `u * kept_mass`; the last kept token if rounding leaves the walk short.
pub fn sample_top_p(row: &[f32], temperature: f32, top_p: f32, u: f32) -> u32 {
    let Some(n) = nucleus(row, temperature, top_p) else {
        return argmax(row);
    };
    let target = u as f64 * n.mass;
    let mut acc = 0.0f64;
    let mut last = 0;
    for (i, &p) in n.probs.iter().enumerate() {
        if p >= n.threshold {
            acc += p as f64;
            last = i;
            if target < acc {
                return i as u32;
            }
        }
    }
    last as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::Rng;

    #[test]
    fn exp_nonpos_is_close_to_exp() {
        let mut worst = 0.0f64;
        let mut x = 0.0f32;
        while x > -87.0 {
            let want = (x as f64).exp();
            let got = exp_nonpos(x) as f64;
            worst = worst.max((got - want).abs() / want);
            x -= 0.00731;
        }
        // 3 f32 ulps (2^-23 each) relative.
        assert!(worst < 3.6e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(-0.0), 1.0);
        assert_eq!(exp_nonpos(-88.0), 0.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos(f32::NAN), 0.0);
    }

    #[test]
    fn argmax_takes_the_first_maximum_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, f32::NAN, 1.5]), 3);
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
    }

    #[test]
    fn temperature_zero_is_argmax() {
        let row = [0.5, 2.0, -1.0, 2.0, 1.9];
        for u in [0.0, 0.5, 0.999] {
            assert_eq!(sample_top_p(&row, 0.0, 0.9, u), 1);
            assert_eq!(sample_top_p(&row, -1.0, 0.9, u), 1);
            assert_eq!(sample_top_p(&row, f32::NAN, 0.9, u), 1);
        }
    }

    #[test]
    fn rows_without_a_finite_maximum_give_their_argmax() {
        let ninf = f32::NEG_INFINITY;
        assert_eq!(sample_top_p(&[ninf, f32::NAN, ninf], 1.0, 0.9, 0.7), 0);
        assert_eq!(sample_top_p(&[f32::NAN; 4], 1.0, 0.9, 0.7), 0);
        assert_eq!(sample_top_p(&[1.0, f32::INFINITY, 2.0], 1.0, 0.9, 0.7), 1);
    }

    #[test]
    fn nan_and_minus_infinity_are_never_drawn() {
        let row = [f32::NAN, 0.0, f32::NEG_INFINITY, 0.0, f32::NAN];
        let n = nucleus(&row, 1.0, 1.0).unwrap();
        assert_eq!(n.probs, vec![0.0, 1.0, 0.0, 1.0, 0.0]);
        assert_eq!(n.mass, 2.0);
        for k in 0..100 {
            let t = sample_top_p(&row, 1.0, 1.0, k as f32 / 100.0);
            assert!(t == 1 || t == 3, "drew {t}");
        }
    }

    #[test]
    fn top_p_one_matches_softmax_frequencies() {
        let row = [1.0f32, -0.5, 2.0, 0.0, 1.5, -2.0, 0.7];
        let temperature = 0.8;
        let n = nucleus(&row, temperature, 1.0).unwrap();
        assert!(
            n.probs.iter().all(|&p| p >= n.threshold),
            "keeps every token"
        );
        let z: f64 = row.iter().map(|&l| (l as f64 / 0.8).exp()).sum();
        let draws = 200_000;
        let mut counts = [0usize; 7];
        let mut rng = Rng::new(7);
        for _ in 0..draws {
            counts[sample_top_p(&row, temperature, 1.0, rng.uniform()) as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let want = (row[i] as f64 / 0.8).exp() / z;
            let got = c as f64 / draws as f64;
            // The binomial standard deviation is at most sqrt(0.25 / 2e5) = 1.1e-3: allow 5 of
            // them, well above chance and well below any probability here (>= 0.9%).
            assert!(
                (got - want).abs() < 5.5e-3,
                "token {i}: {got} vs softmax {want}"
            );
        }
    }

    #[test]
    fn small_top_p_keeps_the_boundary_tie() {
        // temperature 1: p = [e^-2, 1, e^-1, e^-1, e^-3] = [0.135, 1, 0.368, 0.368, 0.050],
        // total 1.921. top_p 0.6 asks for 1.153: {1} has 1, the next threshold e^-1 keeps
        // {1, 2, 3} with 1.736. The two e^-1 tie at the boundary and both stay (a stable sort
        // by probability would stop at {1, 2}, which has 1.368).
        let row = [1.0, 3.0, 2.0, 2.0, 0.0];
        let n = nucleus(&row, 1.0, 0.6).unwrap();
        let kept: Vec<usize> = (0..5).filter(|&i| n.probs[i] >= n.threshold).collect();
        assert_eq!(kept, vec![1, 2, 3]);
        let e1 = exp_nonpos(-1.0);
        assert_eq!(n.threshold, e1);
        assert_eq!(n.mass, 1.0 + 2.0 * e1 as f64);
        // Up to 1 / 1.921 = 0.5206 of the mass the maximum alone is enough.
        assert_eq!(nucleus(&row, 1.0, 0.52).unwrap().threshold, 1.0);
        assert_eq!(nucleus(&row, 1.0, 0.53).unwrap().threshold, e1);
        // The draw walks [1, 2, 3] in index order with cumulative masses 1, 1.368, 1.736: token
        // 1 below u = 1 / 1.736 = 0.576, token 2 below 1.368 / 1.736 = 0.788, then token 3.
        for (u, want) in [
            (0.0, 1),
            (0.57, 1),
            (0.58, 2),
            (0.78, 2),
            (0.79, 3),
            (0.999, 3),
        ] {
            assert_eq!(sample_top_p(&row, 1.0, 0.6, u), want, "u = {u}");
        }
    }

    #[test]
    fn extreme_uniforms_pick_the_first_and_last_kept_tokens() {
        let mut rng = Rng::new(3);
        let row: Vec<f32> = (0..300).map(|_| rng.normal() * 2.0).collect();
        let n = nucleus(&row, 1.0, 0.8).unwrap();
        let kept: Vec<u32> = (0..300u32)
            .filter(|&i| n.probs[i as usize] >= n.threshold)
            .collect();
        assert!(kept.len() > 10 && kept.len() < 300, "{} kept", kept.len());
        let below = kept_mass(&n.probs, f32::from_bits(n.threshold.to_bits() + 1));
        let total = kept_mass(&n.probs, 0.0);
        assert!(n.mass >= 0.8 * total && below < 0.8 * total);
        assert_eq!(sample_top_p(&row, 1.0, 0.8, 0.0), kept[0]);
        assert_eq!(sample_top_p(&row, 1.0, 0.8, 1e-7), kept[0]);
        let last = 1.0 - f32::EPSILON / 2.0;
        assert_eq!(sample_top_p(&row, 1.0, 0.8, last), *kept.last().unwrap());
    }

    #[test]
    fn top_p_zero_keeps_the_tied_maxima() {
        let row = [0.0, 4.0, 1.0, 4.0];
        let n = nucleus(&row, 1.0, 0.0).unwrap();
        assert_eq!(n.threshold, 1.0);
        assert_eq!(sample_top_p(&row, 1.0, 0.0, 0.2), 1);
        assert_eq!(sample_top_p(&row, 1.0, 0.0, 0.7), 3);
        assert_eq!(sample_top_p(&row, 1.0, f32::NAN, 0.7), 3);
    }
}
