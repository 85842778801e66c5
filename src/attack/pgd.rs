//! The PGD update of the embedding attack: a signed-gradient step, then projection of the
//! perturbation onto an L2 or L-infinity ball around the initial embeddings
//! (CPU reference of the pgd-step kernel).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "eps")]
pub enum Ball {
    None,
    L2(f32),
    Linf(f32),
}

/// `e <- proj(e - step * sign(grad))`, per soft token row of width `dim` for the L2 ball
/// (each token's perturbation is projected on its own, as in the authors' code).
pub fn sign_step(e: &mut [f32], grad: &[f32], init: &[f32], step: f32, ball: Ball, dim: usize) {
    assert!(
        e.len() == grad.len() && e.len() == init.len() && e.len().is_multiple_of(dim),
        "pgd: sizes differ"
    );
    for (x, g) in e.iter_mut().zip(grad) {
        // sign(0) = 0, like torch.sign.
        if *g > 0.0 {
            *x -= step;
        } else if *g < 0.0 {
            *x += step;
        }
    }
    project(e, init, ball, dim);
}

/// How the soft tokens move each step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Update {
    /// `e <- e - step * sign(grad)` (the default of the embedding-attack papers).
    #[default]
    Sign,
    /// Adam with learning rate `step` (betas 0.9/0.999, eps 1e-8, bias-corrected, like
    /// `torch.optim.Adam` on the soft embeddings).
    Adam,
}

/// Adam moments of the soft tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamState {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub t: i32,
}

impl AdamState {
    /// Adam's betas here (and in kernels/pgd.cu).
    pub const BETA1: f32 = 0.9;
    pub const BETA2: f32 = 0.999;

    pub fn new(len: usize) -> Self {
        Self {
            m: vec![0.0; len],
            v: vec![0.0; len],
            t: 0,
        }
    }
}

/// [`AdamState`] held where a backend keeps the soft tokens (`BackwardOps::pgd_step`): the
/// moments as f32 buffers of the backend, zero at the start.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceAdam<Buf> {
    pub m: Buf,
    pub v: Buf,
    pub t: i32,
}

/// One Adam step on `e`, then projection of `e - init` onto the ball.
pub fn adam_step(
    e: &mut [f32],
    grad: &[f32],
    init: &[f32],
    st: &mut AdamState,
    lr: f32,
    ball: Ball,
    dim: usize,
) {
    assert!(
        e.len() == grad.len() && e.len() == init.len() && e.len() == st.m.len(),
        "adam: sizes differ"
    );
    const B1: f32 = AdamState::BETA1;
    const B2: f32 = AdamState::BETA2;
    const EPS: f32 = 1e-8;
    st.t += 1;
    let c1 = 1.0 - B1.powi(st.t);
    let c2 = 1.0 - B2.powi(st.t);
    for (((x, &g), m), v) in e.iter_mut().zip(grad).zip(&mut st.m).zip(&mut st.v) {
        *m = B1 * *m + (1.0 - B1) * g;
        *v = B2 * *v + (1.0 - B2) * g * g;
        *x -= lr * (*m / c1) / ((*v / c2).sqrt() + EPS);
    }
    project(e, init, ball, dim);
}

/// The configured update: a signed step, or Adam with `state` (created on first use).
#[allow(clippy::too_many_arguments)]
pub fn update_step(
    update: Update,
    e: &mut [f32],
    grad: &[f32],
    init: &[f32],
    state: &mut Option<AdamState>,
    step: f32,
    ball: Ball,
    dim: usize,
) {
    match update {
        Update::Sign => sign_step(e, grad, init, step, ball, dim),
        Update::Adam => {
            let st = state.get_or_insert_with(|| AdamState::new(e.len()));
            adam_step(e, grad, init, st, step, ball, dim)
        }
    }
}

/// Projects `e - init` onto the ball, in place.
pub fn project(e: &mut [f32], init: &[f32], ball: Ball, dim: usize) {
    match ball {
        Ball::None => {}
        Ball::Linf(eps) => {
            for (x, x0) in e.iter_mut().zip(init) {
                *x = x.clamp(x0 - eps, x0 + eps);
            }
        }
        Ball::L2(eps) => {
            for (row, row0) in e.chunks_exact_mut(dim).zip(init.chunks_exact(dim)) {
                let n: f32 = row
                    .iter()
                    .zip(row0)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>()
                    .sqrt();
                if n > eps {
                    let s = eps / n;
                    for (x, x0) in row.iter_mut().zip(row0) {
                        *x = x0 + (*x - x0) * s;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::Rng;

    #[test]
    fn projection_keeps_the_perturbation_inside_the_ball() {
        let mut r = Rng::new(1);
        let dim = 8;
        let init: Vec<f32> = (0..3 * dim).map(|_| r.normal()).collect();
        for ball in [Ball::L2(0.5), Ball::Linf(0.05)] {
            let mut e = init.clone();
            for _ in 0..50 {
                let g: Vec<f32> = (0..3 * dim).map(|_| r.normal()).collect();
                sign_step(&mut e, &g, &init, 0.03, ball, dim);
                for (row, row0) in e.chunks(dim).zip(init.chunks(dim)) {
                    match ball {
                        Ball::L2(eps) => {
                            let n: f32 = row
                                .iter()
                                .zip(row0)
                                .map(|(a, b)| (a - b) * (a - b))
                                .sum::<f32>()
                                .sqrt();
                            assert!(n <= eps * (1.0 + 1e-5), "L2 norm {n} > {eps}");
                        }
                        Ball::Linf(eps) => {
                            assert!(row
                                .iter()
                                .zip(row0)
                                .all(|(a, b)| (a - b).abs() <= eps + 1e-6));
                        }
                        Ball::None => unreachable!(),
                    }
                }
            }
            // The boundary is reached: the attack uses its budget.
            let d: f32 = e
                .iter()
                .zip(&init)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(d > 0.0);
        }
    }

    #[test]
    fn adam_first_step_is_lr_against_the_gradient_and_stays_in_the_ball() {
        // Bias correction makes the first Adam step lr * g / |g| = lr * sign(g).
        let mut e = vec![1.0f32, 1.0, 1.0];
        let init = e.clone();
        let mut st = None;
        update_step(
            Update::Adam,
            &mut e,
            &[2.0, -0.5, 0.0],
            &init,
            &mut st,
            0.1,
            Ball::None,
            3,
        );
        let want = [0.9f32, 1.1, 1.0];
        assert!(
            e.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
            "{e:?}"
        );
        assert_eq!(st.as_ref().unwrap().t, 1);
        // A constant gradient keeps the step at lr; the Linf ball stops it at eps.
        for _ in 0..20 {
            update_step(
                Update::Adam,
                &mut e,
                &[2.0, -0.5, 0.0],
                &init,
                &mut st,
                0.1,
                Ball::Linf(0.5),
                3,
            );
        }
        assert!(e
            .iter()
            .zip(&init)
            .all(|(a, b)| (a - b).abs() <= 0.5 + 1e-6));
        assert!(
            (e[0] - 0.5).abs() < 1e-6 && (e[1] - 1.5).abs() < 1e-6 && e[2] == 1.0,
            "{e:?}"
        );
    }

    #[test]
    fn sign_step_moves_against_the_gradient() {
        let mut e = vec![1.0f32, 1.0, 1.0];
        let init = e.clone();
        sign_step(&mut e, &[2.0, -0.5, 0.0], &init, 0.1, Ball::None, 3);
        assert_eq!(e, vec![0.9, 1.1, 1.0]);
    }
}
