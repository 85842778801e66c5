//! Retain KL at temperature T, fused with the softmax: one pass over each row of logits,
//! no materialised probability tensor.
//!
//! `KL_T(p_orig || p_tuned) * T^2`, torch `reduction="batchmean"` on `[B, S, V]`: the sum over
//! tokens and vocabulary divided by B. Masked positions contribute nothing (in the authors' code
//! both logits are zeroed there: uniform against uniform).

use rayon::prelude::*;

/// Returns the loss and writes `d loss / d tuned_logits` (times `weight`) into `grad`
/// (`=`, not `+=`; masked rows get zeros).
#[allow(clippy::too_many_arguments)]
pub fn kl_retain(
    orig: &[f32],
    tuned: &[f32],
    mask: &[f64],
    batch: usize,
    vocab: usize,
    temperature: f64,
    weight: f64,
    grad: Option<&mut [f32]>,
) -> f64 {
    let rows = mask.len();
    assert_eq!(
        orig.len(),
        rows * vocab,
        "kl: orig logits are not [rows={rows}, vocab={vocab}]"
    );
    assert_eq!(tuned.len(), orig.len(), "kl: tuned logits size");
    assert!(
        batch > 0 && rows.is_multiple_of(batch),
        "kl: mask rows {rows} not divisible by batch {batch}"
    );
    let t = temperature;
    let scale = t * t / batch as f64;
    let row_kl = |r: usize, g: Option<&mut [f32]>| -> f64 {
        if mask[r] == 0.0 {
            if let Some(g) = g {
                g.fill(0.0);
            }
            return 0.0;
        }
        let zo = &orig[r * vocab..(r + 1) * vocab];
        let zt = &tuned[r * vocab..(r + 1) * vocab];
        let lse = |z: &[f32]| {
            let m = z
                .iter()
                .fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64 / t));
            m + z
                .iter()
                .map(|&x| (x as f64 / t - m).exp())
                .sum::<f64>()
                .ln()
        };
        let (lo, lt) = (lse(zo), lse(zt));
        let mut kl = 0.0;
        for v in 0..vocab {
            let lp = zo[v] as f64 / t - lo;
            let lq = zt[v] as f64 / t - lt;
            kl += lp.exp() * (lp - lq);
        }
        if let Some(g) = g {
            for v in 0..vocab {
                let p = (zo[v] as f64 / t - lo).exp();
                let q = (zt[v] as f64 / t - lt).exp();
                g[v] = (weight * scale * (q - p) / t) as f32;
            }
        }
        kl
    };
    // Row KLs in parallel, summed in row order: a parallel sum's association would depend on
    // how the work was split, and the loss would differ in its last bits from run to run.
    let per_row: Vec<f64> = match grad {
        Some(g) => {
            assert_eq!(g.len(), orig.len(), "kl: grad size");
            g.par_chunks_mut(vocab)
                .enumerate()
                .map(|(r, gr)| row_kl(r, Some(gr)))
                .collect()
        }
        None => (0..rows).into_par_iter().map(|r| row_kl(r, None)).collect(),
    };
    weight * scale * per_row.iter().sum::<f64>()
}
