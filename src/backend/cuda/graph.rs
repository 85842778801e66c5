//! Decode steps recorded once into a CUDA graph and replayed per token.
//!
//! A decode step is a few hundred small launches (275 for SmolLM2), each costing the host a
//! few microseconds; replaying a captured graph queues them all in one call. A graph replays
//! its launches with the arguments they were recorded with, so what changes from token to
//! token lives on the device, in a [`StepState`]: the position and the token that enters the
//! step. While a state is active on a handle ([`CudaBackend::with_step_state`]), `embedding`
//! reads its token, and `rope_kv_store` and `attention` their position, from there (their
//! kernels take a `pos_dev` pointer); [`CudaBackend::choose_into_step`] writes the next token
//! there and moves the position on. The driver is `llama::generate`.

use super::device::{int, Arg, CudaBackend, CudaBuf};
use crate::backend::AttnShape;
use anyhow::{ensure, Context, Result};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, DevicePtr, LaunchConfig};
use std::sync::atomic::Ordering;

/// Byte offsets of the fields of a [`StepState`] (u32 words).
const POS: u64 = 0;
const TOKEN: u64 = 4;
const UNIFORM: u64 = 8;

/// A replayed decode's device-side state: `[pos, token, uniform, 0]` as u32 words (the
/// uniform an f32's bits). One sequence.
pub struct StepState {
    words: CudaSlice<u32>,
}

/// How [`CudaBackend::choose_into_step`] picks the next token.
#[derive(Debug, Clone, Copy)]
pub enum StepChoice {
    Argmax,
    /// Top-p with the uniform the host last wrote ([`CudaBackend::set_step_uniform`]).
    TopP {
        temperature: f32,
        top_p: f32,
    },
}

/// A recorded decode step: its graph, and the launches it holds.
pub struct StepGraph {
    graph: CudaGraph,
    pub launches: u64,
}

impl CudaBackend {
    /// A state at position `pos` whose next step embeds `token`.
    pub fn step_state(&self, pos: usize, token: u32) -> Result<StepState> {
        let words = self
            .stream()
            .clone_htod(&[int(pos, "decode position") as u32, token, 0, 0])
            .context("allocating the decode-step state")?;
        Ok(StepState { words })
    }

    fn state_addr(&self, st: &StepState) -> u64 {
        let (ptr, _sync) = st.words.device_ptr(self.stream());
        ptr
    }

    /// Runs `f` with `st` active on this handle and its clones (see the module doc), and
    /// deactivates it afterwards, also when `f` fails or panics. Meanwhile no other thread
    /// may queue work through the handle: its embeddings and attention would read the state.
    pub fn with_step_state<R>(&self, st: &StepState, f: impl FnOnce() -> R) -> R {
        struct Off<'a>(&'a CudaBackend);
        impl Drop for Off<'_> {
            fn drop(&mut self) {
                self.0.step.store(0, Ordering::Relaxed);
            }
        }
        let prev = self.step.swap(self.state_addr(st), Ordering::Relaxed);
        assert_eq!(
            prev, 0,
            "a decode-step state is already active on this handle"
        );
        let _off = Off(self);
        f()
    }

    /// The active state's position address for a launch of shape `s` (0 when none is active).
    pub(super) fn step_pos(&self, s: AttnShape) -> u64 {
        let base = self.step.load(Ordering::Relaxed);
        if base != 0 {
            assert!(
                s.batch == 1 && s.q_len == 1,
                "a replayed decode step runs one token of one sequence, not {s:?}"
            );
        }
        if base == 0 {
            0
        } else {
            base + POS
        }
    }

    /// The active state's token address for an embedding of `rows` ids (0 when none is active).
    pub(super) fn step_token(&self, rows: usize) -> u64 {
        let base = self.step.load(Ordering::Relaxed);
        if base == 0 {
            return 0;
        }
        assert_eq!(rows, 1, "a replayed decode step embeds one token");
        base + TOKEN
    }

    /// Chooses the next token from `logits` (`[1, width]`) into `st` and moves its position on
    /// by one: the last launch of a recorded step.
    pub fn choose_into_step(
        &self,
        logits: &CudaBuf,
        width: usize,
        choice: StepChoice,
        st: &StepState,
    ) {
        assert_eq!(
            logits.len, width,
            "choose_into_step: logits are not [1, {width}]"
        );
        let base = self.state_addr(st);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let w = int(width, "vocabulary");
        match choice {
            StepChoice::Argmax => {
                let name = format!("argmax_{}", logits.dtype.suffix());
                let mut args = [
                    Arg::In(logits),
                    Arg::I32(w),
                    Arg::Ptr(base + TOKEN),
                    Arg::Ptr(base + POS),
                ];
                // SAFETY: argmax_T(const T* logits, int width, u32* out, u32* advance): one row;
                // out and advance are words of the state.
                unsafe { self.launch(&name, cfg, &mut args) };
            }
            StepChoice::TopP { temperature, top_p } => {
                let name = format!("sample_top_p_{}", logits.dtype.suffix());
                let mut args = [
                    Arg::In(logits),
                    Arg::I32(w),
                    Arg::Ptr(base + UNIFORM),
                    Arg::F32(temperature),
                    Arg::F32(top_p),
                    Arg::Ptr(base + TOKEN),
                    Arg::Ptr(base + POS),
                ];
                // SAFETY: sample_top_p_T(const T* logits, int width, const float* uniforms,
                // float, float, u32* out, u32* advance): one row; uniforms, out and advance are
                // words of the state.
                unsafe { self.launch(&name, cfg, &mut args) };
            }
        }
    }

    /// Writes the uniform the next top-p choice draws with (queued before the replay).
    pub fn set_step_uniform(&self, st: &mut StepState, u: f32) -> Result<()> {
        ensure!((0.0..1.0).contains(&u), "uniform {u} not in [0, 1)");
        let mut view = st.words.slice_mut(2..3);
        self.stream()
            .memcpy_htod(&[u.to_bits()], &mut view)
            .context("writing the decode step's uniform")
    }

    /// `(position, token)` of `st`, after everything queued so far.
    pub fn read_step_state(&self, st: &StepState) -> Result<(usize, u32)> {
        let w = self
            .stream()
            .clone_dtoh(&st.words)
            .context("reading the decode-step state")?;
        self.stream()
            .synchronize()
            .context("CUDA error in a decode step")?;
        Ok((w[0] as usize, w[1]))
    }

    /// Records the launches `f` queues into a graph instead of running them. `f` must
    /// allocate, copy and synchronise nothing on this handle (the driver refuses, and the
    /// capture fails with its error).
    pub fn record(&self, f: impl FnOnce() -> Result<()>) -> Result<StepGraph> {
        let before = self.launches();
        self.stream()
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .context("starting a CUDA graph capture")?;
        let res = f();
        let graph = self
            .stream()
            .end_capture(CUgraphInstantiate_flags(0))
            .context("ending the CUDA graph capture");
        res.context("recording a decode step")?;
        let graph = graph?.context("the CUDA graph capture recorded nothing")?;
        graph.upload().context("uploading the CUDA graph")?;
        Ok(StepGraph {
            graph,
            launches: self.launches() - before,
        })
    }

    /// Queues one run of a recorded step.
    pub fn replay(&self, g: &StepGraph) -> Result<()> {
        g.graph.launch().context("launching a CUDA graph")
    }
}
