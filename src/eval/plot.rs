//! PCA scatter plot of harmful and benign representations, original and evaluated model
//! (PNG, plotters with an embedded font so it renders the same on every machine).

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// The top-`k` principal directions of the rows of `x` (`[n, d]`), by power iteration with
/// deflation on the covariance.
pub fn principal_components(x: &[Vec<f64>], k: usize) -> Vec<Vec<f64>> {
    let n = x.len();
    let d = x.first().map_or(0, Vec::len);
    let mean: Vec<f64> = (0..d)
        .map(|j| x.iter().map(|r| r[j]).sum::<f64>() / n.max(1) as f64)
        .collect();
    let centred: Vec<Vec<f64>> = x
        .iter()
        .map(|r| r.iter().zip(&mean).map(|(a, m)| a - m).collect())
        .collect();
    let mut cov = vec![0.0; d * d];
    for r in &centred {
        for i in 0..d {
            if r[i] == 0.0 {
                continue;
            }
            for j in 0..d {
                cov[i * d + j] += r[i] * r[j];
            }
        }
    }
    let mut comps: Vec<Vec<f64>> = Vec::new();
    for c in 0..k {
        let mut v: Vec<f64> = (0..d)
            .map(|i| 1.0 + ((i * 7 + c * 13) % 11) as f64 * 0.1)
            .collect();
        for _ in 0..300 {
            let mut w = vec![0.0; d];
            for i in 0..d {
                w[i] = (0..d).map(|j| cov[i * d + j] * v[j]).sum();
            }
            for p in &comps {
                let dot: f64 = w.iter().zip(p).map(|(a, b)| a * b).sum();
                w.iter_mut().zip(p).for_each(|(a, b)| *a -= dot * b);
            }
            let norm = w.iter().map(|a| a * a).sum::<f64>().sqrt();
            if norm == 0.0 {
                break;
            }
            v = w.iter().map(|a| a / norm).collect();
        }
        comps.push(v);
    }
    comps
}

/// One group of points: name, colour and `[n, d]` vectors.
pub struct Group<'a> {
    pub name: &'a str,
    pub color: RGBColor,
    pub filled: bool,
    pub points: &'a [Vec<f64>],
}

/// Projects every group onto the top-2 principal components of `basis` and draws them.
pub fn pca_plot(path: &Path, title: &str, basis: &[Vec<f64>], groups: &[Group]) -> Result<()> {
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let pcs = principal_components(basis, 2);
    anyhow::ensure!(pcs.len() == 2, "PCA needs at least two dimensions");
    let project = |v: &Vec<f64>| -> (f64, f64) {
        let p = |c: &Vec<f64>| v.iter().zip(c).map(|(a, b)| a * b).sum::<f64>();
        (p(&pcs[0]), p(&pcs[1]))
    };
    let projected: Vec<Vec<(f64, f64)>> = groups
        .iter()
        .map(|g| g.points.iter().map(project).collect())
        .collect();
    let all = projected.iter().flatten();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let (px, py) = ((x1 - x0).max(1e-9) * 0.08, (y1 - y0).max(1e-9) * 0.08);
    let root = BitMapBackend::new(path, (900, 700)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((x0 - px)..(x1 + px), (y0 - py)..(y1 + py))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("PC 1 (of the original model's representations)")
        .y_desc("PC 2")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    for (g, pts) in groups.iter().zip(&projected) {
        let color = g.color;
        let filled = g.filled;
        chart
            .draw_series(pts.iter().map(move |&(x, y)| {
                let style = if filled {
                    color.filled()
                } else {
                    color.stroke_width(2)
                };
                Circle::new((x, y), 5, style)
            }))
            .map_err(|e| err(&e))?
            .label(g.name)
            .legend(move |(x, y)| {
                let style = if filled {
                    color.filled()
                } else {
                    color.stroke_width(2)
                };
                Circle::new((x + 8, y), 5, style)
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_iteration_finds_the_dominant_axes() {
        // Points spread mostly along (1, 1, 0), then along (1, -1, 0).
        let mut x = Vec::new();
        for i in 0..40 {
            let t = (i as f64 - 19.5) / 5.0;
            for s in [-1.0, 1.0] {
                x.push(vec![t + 0.3 * s, t - 0.3 * s, 0.0]);
            }
        }
        let pcs = principal_components(&x, 2);
        let r = std::f64::consts::FRAC_1_SQRT_2;
        assert!(
            (pcs[0][0].abs() - r).abs() < 1e-3 && (pcs[0][1].abs() - r).abs() < 1e-3,
            "{:?}",
            pcs[0]
        );
        assert!(pcs[0][0] * pcs[0][1] > 0.0);
        assert!(pcs[1][0] * pcs[1][1] < 0.0, "{:?}", pcs[1]);
        let dot: f64 = pcs[0].iter().zip(&pcs[1]).map(|(a, b)| a * b).sum();
        assert!(dot.abs() < 1e-6);
    }

    #[test]
    fn writes_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pca.png");
        let a: Vec<Vec<f64>> = (0..10)
            .map(|i| vec![i as f64, 1.0, (i % 3) as f64])
            .collect();
        let b: Vec<Vec<f64>> = (0..10)
            .map(|i| vec![-(i as f64), 2.0, (i % 2) as f64])
            .collect();
        let basis: Vec<Vec<f64>> = a.iter().chain(&b).cloned().collect();
        pca_plot(
            &p,
            "test",
            &basis,
            &[
                Group {
                    name: "a",
                    color: RED,
                    filled: true,
                    points: &a,
                },
                Group {
                    name: "b",
                    color: BLUE,
                    filled: false,
                    points: &b,
                },
            ],
        )
        .unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(bytes.len() > 5000);
    }
}
