//! A learned latent adversary inserted into the residual stream (the hard-negative miner of the
//! CRL authors' code): at hidden-state index `index` (the stream entering block `index`) every
//! row becomes `h + D h + b`, i.e. `A h + b` with `A = I + D` initialised to the identity. The
//! backward pass propagates through it (`dh_pre = dh + dh D`) and accumulates `dD`, `db`.

use crate::backend::Backend;
use anyhow::{ensure, Result};

/// The adversary's parameters on the device: `d` is `[hidden, hidden]` (row `i` maps the
/// stream onto output feature `i`), `b` is `[hidden]`, both f32.
pub struct LatentHook<B: Backend> {
    pub index: usize,
    pub d: B::Buf,
    pub b: B::Buf,
}

/// What the backward pass needs of a hooked forward: the stream before the hook and `D`.
pub struct LatentActs<B: Backend> {
    pub index: usize,
    pub x_pre: B::Buf,
    pub d: B::Buf,
}

impl<B: Backend> LatentHook<B> {
    /// Uploads host parameters; `index` must lie strictly between the embeddings and the final
    /// norm (1..num_layers-1) so that a block on each side sees it.
    pub fn new(be: &B, index: usize, num_layers: usize, d: &[f32], b: &[f32]) -> Result<Self> {
        ensure!(
            index >= 1 && index < num_layers,
            "latent adversary: hidden-state index {index} is not between blocks (1..{})",
            num_layers - 1
        );
        ensure!(
            d.len() == b.len() * b.len(),
            "latent adversary: D holds {} values, b {} (need hidden^2 and hidden)",
            d.len(),
            b.len()
        );
        Ok(Self {
            index,
            d: be.upload_f32(d)?,
            b: be.upload_f32(b)?,
        })
    }
}
