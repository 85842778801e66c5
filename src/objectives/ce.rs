//! Cross-entropy of chosen target tokens, fused with the softmax (one pass per logits row):
//! the attack loss (mean CE of the target string under teacher forcing).

/// Mean over `targets` (`(row, token)`) of `-log softmax(logits[row])[token]`. Returns the loss,
/// whether every target token is its row's argmax (teacher-forced success), and, when `grad`
/// is given, writes `d loss / d logits` into it (`=`; rows not in `targets` get zeros).
pub fn target_ce(
    logits: &[f32],
    vocab: usize,
    targets: &[(usize, u32)],
    grad: Option<&mut [f32]>,
) -> (f64, bool) {
    let mut grad = grad;
    if let Some(g) = grad.as_deref_mut() {
        assert_eq!(g.len(), logits.len(), "target_ce: grad size");
        g.fill(0.0);
    }
    target_ce_add(logits, vocab, targets, grad)
}

/// [`target_ce`] of several groups of targets in one logits tensor (`[rows, vocab]`), each
/// with its own mean: the attack's batch, one group per sequence. Returns each group's loss
/// and argmax flag; `grad` (`=`) gets the gradient of the sum of the group means, each group's
/// rows exactly as [`target_ce`] of that group alone writes them and zeros elsewhere. The
/// groups must pass [`check_target_groups`].
pub fn target_ce_groups(
    logits: &[f32],
    vocab: usize,
    groups: &[&[(usize, u32)]],
    grad: Option<&mut [f32]>,
) -> Vec<(f64, bool)> {
    assert!(
        vocab > 0 && logits.len().is_multiple_of(vocab),
        "target_ce: {} logits are not rows of {vocab}",
        logits.len()
    );
    check_target_groups(groups, logits.len() / vocab, vocab);
    let mut grad = grad;
    if let Some(g) = grad.as_deref_mut() {
        assert_eq!(g.len(), logits.len(), "target_ce: grad size");
        g.fill(0.0);
    }
    groups
        .iter()
        .map(|t| target_ce_add(logits, vocab, t, grad.as_deref_mut()))
        .collect()
}

/// The preconditions of [`target_ce_groups`] on `[rows, vocab]` logits, which every backend
/// asserts: no group is empty, every row and token is in range, and no row is the target of
/// two `(row, token)` pairs (a device writes each target row's gradient, it does not add).
pub fn check_target_groups(groups: &[&[(usize, u32)]], rows: usize, vocab: usize) {
    let mut seen = std::collections::HashSet::new();
    for g in groups {
        assert!(!g.is_empty(), "target_ce: no targets");
        for &(row, tok) in *g {
            assert!(
                row < rows && (tok as usize) < vocab,
                "target_ce: target ({row}, {tok}) outside [{rows}, {vocab}] logits"
            );
            assert!(seen.insert(row), "target_ce: row {row} is targeted twice");
        }
    }
}

/// [`target_ce`] without zeroing `grad` first: adds the gradient of the mean.
fn target_ce_add(
    logits: &[f32],
    vocab: usize,
    targets: &[(usize, u32)],
    grad: Option<&mut [f32]>,
) -> (f64, bool) {
    assert!(!targets.is_empty(), "target_ce: no targets");
    let n = targets.len() as f64;
    let mut loss = 0.0;
    let mut all_argmax = true;
    let mut grad = grad;
    for &(row, tok) in targets {
        let z = &logits[row * vocab..(row + 1) * vocab];
        let max = z.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let sum: f64 = z.iter().map(|&x| ((x - max) as f64).exp()).sum();
        let lse = max as f64 + sum.ln();
        loss += (lse - z[tok as usize] as f64) / n;
        // argmax with torch's first-on-ties rule
        let mut best = 0;
        for (i, &v) in z.iter().enumerate() {
            if v > z[best] {
                best = i;
            }
        }
        all_argmax &= best == tok as usize;
        if let Some(g) = grad.as_deref_mut() {
            let gr = &mut g[row * vocab..(row + 1) * vocab];
            for (gi, &x) in gr.iter_mut().zip(z) {
                *gi += (((x as f64 - lse).exp()) / n) as f32;
            }
            gr[tok as usize] -= (1.0 / n) as f32;
        }
    }
    (loss, all_argmax)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_argmax_and_gradient() {
        let logits = [1.0f32, 2.0, 0.5, 0.0, 3.0, -1.0];
        let (l, ok) = target_ce(&logits, 3, &[(0, 1), (1, 1)], None);
        let ce0 = (1f64.exp() + 2f64.exp() + 0.5f64.exp()).ln() - 2.0;
        let ce1 = (1.0 + 3f64.exp() + (-1f64).exp()).ln() - 3.0;
        assert!((l - (ce0 + ce1) / 2.0).abs() < 1e-6);
        assert!(ok);
        let (_, ok) = target_ce(&logits, 3, &[(0, 0)], None);
        assert!(!ok);
        let mut g = vec![f32::NAN; 6];
        target_ce(&logits, 3, &[(0, 1), (1, 1)], Some(&mut g));
        let h = 1e-3f32;
        for i in 0..6 {
            let mut p = logits;
            p[i] += h;
            let (lp, _) = target_ce(&p, 3, &[(0, 1), (1, 1)], None);
            p[i] -= 2.0 * h;
            let (lm, _) = target_ce(&p, 3, &[(0, 1), (1, 1)], None);
            assert!(
                ((lp - lm) / (2.0 * h as f64) - g[i] as f64).abs() < 1e-3,
                "{i}"
            );
        }
    }
}
