//! Distances between two representation vectors, with their gradients.
//! Cosine normalises as torch's `F.normalize`: x / max(|x|, 1e-12).

pub const NORM_EPS: f64 = 1e-12;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Distance {
    /// `||a - b||_2`
    L2,
    /// `1 - cos_sim(a, b)`
    Cos,
    /// `0.3 * ||a/|a| - b/|b|||^2`
    L2sqn,
    /// `l2(a, b) + 10 * (1 - relu(cos_sim(a, b)))`
    Mix,
}

impl std::str::FromStr for Distance {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "l2" => Self::L2,
            "cos" | "cosine" => Self::Cos,
            "l2sqn" | "l2sq-normalised" | "l2sq-normalized" => Self::L2sqn,
            "mix" => Self::Mix,
            other => anyhow::bail!("unknown distance {other:?} (l2, cos, l2sqn, mix)"),
        })
    }
}

pub fn norm(a: &[f64]) -> f64 {
    a.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Cosine similarity with F.normalize semantics.
pub fn cos_sim(a: &[f64], b: &[f64]) -> f64 {
    dot(a, b) / (norm(a).max(NORM_EPS) * norm(b).max(NORM_EPS))
}

/// Adds `w * d cos_sim(a, b) / da` to `ga` and `w * d cos_sim / db` to `gb`.
pub fn cos_sim_grad(a: &[f64], b: &[f64], w: f64, ga: Option<&mut [f64]>, gb: Option<&mut [f64]>) {
    let (na, nb) = (norm(a), norm(b));
    let (da, db) = (na.max(NORM_EPS), nb.max(NORM_EPS));
    let c = dot(a, b) / (da * db);
    // d/da [a.b / (|a|_e |b|_e)] = b/(|a|_e|b|_e) - c * a/|a|^2 (second part only when |a| > eps)
    if let Some(ga) = ga {
        let sa = if na > NORM_EPS { c / (na * na) } else { 0.0 };
        for ((g, &ai), &bi) in ga.iter_mut().zip(a).zip(b) {
            *g += w * (bi / (da * db) - sa * ai);
        }
    }
    if let Some(gb) = gb {
        let sb = if nb > NORM_EPS { c / (nb * nb) } else { 0.0 };
        for ((g, &ai), &bi) in gb.iter_mut().zip(a).zip(b) {
            *g += w * (ai / (da * db) - sb * bi);
        }
    }
}

impl Distance {
    pub fn value(self, a: &[f64], b: &[f64]) -> f64 {
        match self {
            Self::L2 => a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y) * (x - y))
                .sum::<f64>()
                .sqrt(),
            Self::Cos => 1.0 - cos_sim(a, b),
            Self::L2sqn => {
                let (da, db) = (norm(a).max(NORM_EPS), norm(b).max(NORM_EPS));
                0.3 * a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x / da - y / db).powi(2))
                    .sum::<f64>()
            }
            Self::Mix => Self::L2.value(a, b) + 10.0 * (1.0 - cos_sim(a, b).max(0.0)),
        }
    }

    /// Adds `w * dd/da` to `ga` and `w * dd/db` to `gb` (either may be skipped).
    pub fn grad(
        self,
        a: &[f64],
        b: &[f64],
        w: f64,
        mut ga: Option<&mut [f64]>,
        mut gb: Option<&mut [f64]>,
    ) {
        match self {
            Self::L2 => {
                let d = Self::L2.value(a, b);
                if d == 0.0 {
                    return; // torch's subgradient of the norm at 0
                }
                for i in 0..a.len() {
                    let g = w * (a[i] - b[i]) / d;
                    if let Some(ga) = ga.as_deref_mut() {
                        ga[i] += g;
                    }
                    if let Some(gb) = gb.as_deref_mut() {
                        gb[i] -= g;
                    }
                }
            }
            Self::Cos => cos_sim_grad(a, b, -w, ga, gb),
            Self::L2sqn => {
                let (na, nb) = (norm(a), norm(b));
                let (da, db) = (na.max(NORM_EPS), nb.max(NORM_EPS));
                // g_hat = 0.6 (a_hat - b_hat); back through normalisation of each side.
                let diff: Vec<f64> = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| 0.6 * (x / da - y / db))
                    .collect();
                let back = |v: &[f64], nv: f64, dv: f64, g: &mut [f64], sign: f64| {
                    let proj = if nv > NORM_EPS {
                        dot(&diff, v) / (nv * nv)
                    } else {
                        0.0
                    };
                    for i in 0..v.len() {
                        g[i] += sign * w * (diff[i] - proj * v[i]) / dv;
                    }
                };
                if let Some(ga) = ga {
                    back(a, na, da, ga, 1.0);
                }
                if let Some(gb) = gb {
                    back(b, nb, db, gb, -1.0);
                }
            }
            Self::Mix => {
                Self::L2.grad(a, b, w, ga.as_deref_mut(), gb.as_deref_mut());
                if cos_sim(a, b) > 0.0 {
                    cos_sim_grad(a, b, -10.0 * w, ga, gb);
                }
            }
        }
    }
}

/// A distance and its gradient from the statistics `(|a|^2, |b|^2, a.b, |a - b|^2)` of a pair:
/// `d(a, b)`, `dd/da = da.0 a + da.1 b` and `dd/db = db.0 a + db.1 b`. Every distance here
/// is a function of these four numbers with gradients in the span of `a` and `b`, so a device
/// can reduce each row to its statistics and apply the gradient as a row combination
/// (`BackwardOps::row_stats` / `row_combine`) without the host seeing the vectors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistCoef {
    pub value: f64,
    pub da: (f64, f64),
    pub db: (f64, f64),
}

impl Distance {
    pub fn from_stats(self, [aa, bb, ab, dd]: [f64; 4]) -> DistCoef {
        let (na, nb) = (aa.max(0.0).sqrt(), bb.max(0.0).sqrt());
        let (ea, eb) = (na.max(NORM_EPS), nb.max(NORM_EPS));
        let c = ab / (ea * eb);
        let l2 = || {
            let e = dd.max(0.0).sqrt();
            if e == 0.0 {
                // torch's subgradient of the norm at 0
                DistCoef {
                    value: 0.0,
                    da: (0.0, 0.0),
                    db: (0.0, 0.0),
                }
            } else {
                DistCoef {
                    value: e,
                    da: (1.0 / e, -1.0 / e),
                    db: (-1.0 / e, 1.0 / e),
                }
            }
        };
        // 1 - cos_sim and its gradient (F.normalize semantics: the |.|^2 terms only above eps).
        let cos = || DistCoef {
            value: 1.0 - c,
            da: (if na > NORM_EPS { c / aa } else { 0.0 }, -1.0 / (ea * eb)),
            db: (-1.0 / (ea * eb), if nb > NORM_EPS { c / bb } else { 0.0 }),
        };
        match self {
            Self::L2 => l2(),
            Self::Cos => cos(),
            Self::L2sqn => {
                let value = 0.3 * (aa / (ea * ea) + bb / (eb * eb) - 2.0 * ab / (ea * eb)).max(0.0);
                // diff = 0.6 (a/ea - b/eb); dd/da = (diff - (diff.a / |a|^2) a) / ea,
                // dd/db = -(diff - (diff.b / |b|^2) b) / eb.
                let pa = if na > NORM_EPS {
                    0.6 * (aa / ea - ab / eb) / aa
                } else {
                    0.0
                };
                let pb = if nb > NORM_EPS {
                    0.6 * (ab / ea - bb / eb) / bb
                } else {
                    0.0
                };
                DistCoef {
                    value,
                    da: ((0.6 / ea - pa) / ea, -0.6 / (eb * ea)),
                    db: (-0.6 / (ea * eb), (0.6 / eb + pb) / eb),
                }
            }
            Self::Mix => {
                let (l, k) = (l2(), cos());
                let on = if c > 0.0 { 10.0 } else { 0.0 };
                DistCoef {
                    value: l.value + 10.0 * (1.0 - c.max(0.0)),
                    da: (l.da.0 + on * k.da.0, l.da.1 + on * k.da.1),
                    db: (l.db.0 + on * k.db.0, l.db.1 + on * k.db.1),
                }
            }
        }
    }
}

/// `(|a|^2, |b|^2, a.b, |a - b|^2)` in f64.
pub fn pair_stats(a: &[f64], b: &[f64]) -> [f64; 4] {
    let mut s = [0.0; 4];
    for (x, y) in a.iter().zip(b) {
        s[0] += x * x;
        s[1] += y * y;
        s[2] += x * y;
        s[3] += (x - y) * (x - y);
    }
    s
}

#[cfg(test)]
mod stats_tests {
    use super::*;
    use crate::util::Rng;

    /// from_stats gives every distance's value and gradient exactly as value()/grad() do,
    /// on random pairs, on a pair with a = b (L2 at 0) and with one side zero.
    #[test]
    fn from_stats_matches_value_and_grad() {
        let mut r = Rng::new(3);
        let n = 24;
        let rand = |r: &mut Rng| (0..n).map(|_| r.normal() as f64).collect::<Vec<f64>>();
        let mut pairs = Vec::new();
        for _ in 0..5 {
            pairs.push((rand(&mut r), rand(&mut r)));
        }
        let a = rand(&mut r);
        pairs.push((a.clone(), a.clone()));
        // a close to b: cos near 1 (Mix's relu on), and one anti-aligned pair (relu off).
        pairs.push((a.clone(), a.iter().map(|x| x * 1.5 + 1e-3).collect()));
        pairs.push((a.clone(), a.iter().map(|x| -x).collect()));
        pairs.push((vec![0.0; n], a.clone()));
        for dist in [Distance::L2, Distance::Cos, Distance::L2sqn, Distance::Mix] {
            for (a, b) in &pairs {
                let k = dist.from_stats(pair_stats(a, b));
                let want = dist.value(a, b);
                assert!(
                    (k.value - want).abs() <= 1e-9 * (1.0 + want.abs()),
                    "{dist:?} value {} vs {want}",
                    k.value
                );
                let (mut ga, mut gb) = (vec![0.0; n], vec![0.0; n]);
                dist.grad(a, b, 1.0, Some(&mut ga), Some(&mut gb));
                for i in 0..n {
                    let (wa, wb) = (k.da.0 * a[i] + k.da.1 * b[i], k.db.0 * a[i] + k.db.1 * b[i]);
                    assert!(
                        (wa - ga[i]).abs() <= 1e-9 * (1.0 + ga[i].abs()),
                        "{dist:?} da[{i}] {wa} vs {}",
                        ga[i]
                    );
                    assert!(
                        (wb - gb[i]).abs() <= 1e-9 * (1.0 + gb[i].abs()),
                        "{dist:?} db[{i}] {wb} vs {}",
                        gb[i]
                    );
                }
            }
        }
    }
}
