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
