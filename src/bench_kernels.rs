//! `repshield bench kernels`: every op of the backend at a model shape with random inputs,
//! timed after warm-up (median of `--repeats`; on the GPU with CUDA events and the L2 cache
//! flushed before each repetition), next to its counted floor: the larger of FLOPs / peak and
//! bytes / measured bandwidth (DESIGN.md, performance method). Optionally side by side with
//! PyTorch doing the same op (tools/bench_kernels_torch.py: cuBLAS GEMMs, SDPA attention).
//! Built with the `cublaslt` feature, each projection GEMM is also timed through cuBLASLt on the
//! same buffers, the same way, in the same run.

use crate::backend::cpu::CpuBackend;
use crate::backend::{AttnShape, BackwardOps};
use crate::bench::{median, run_python_json, shape_config};
use crate::model::ModelConfig;
use crate::train::adamw::AdamWConfig;
use crate::util::Rng;
use anyhow::{ensure, Result};
use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

#[derive(clap::Args, Debug, Clone)]
pub struct KernelsArgs {
    /// Model shape: smollm2, llama3-8b, mistral-7b, qwen2.5-0.5b, tiny.
    #[arg(long, default_value = "llama3-8b")]
    pub shape: String,
    /// cpu, cuda, or auto (CUDA when a GPU and compiled kernels are present).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Token rows of the prefill/training-style ops (one sequence of this length for attention).
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    /// KV-cache length of the decode attention.
    #[arg(long, default_value_t = 4096)]
    pub ctx: usize,
    /// Timed repetitions per op after one warm-up; the median is reported.
    #[arg(long, default_value_t = 20)]
    pub repeats: usize,
    /// Peak dense FLOP/s of the device in TFLOP/s (bf16 tensor cores on a GPU) for the floor;
    /// default: a table of known GPUs, the measured f32 FMA peak on the CPU.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Only ops whose name contains one of these comma-separated strings.
    #[arg(long)]
    pub only: Option<String>,
    /// Also time the same ops in PyTorch with this Python interpreter.
    #[arg(long)]
    pub compare_python: Option<PathBuf>,
    /// Path of bench_kernels_torch.py (default: tools/ of this source tree).
    #[arg(long)]
    pub script: Option<PathBuf>,
    /// Write the rows as JSON to this file as well.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device name, from the vendors'
/// data sheets.
pub fn known_peak_tflops(name: &str) -> Option<f64> {
    let n = name.to_ascii_uppercase();
    [
        ("H200", 989.4),
        ("H100 PCIE", 756.0),
        ("H100", 989.4),
        ("A100", 312.0),
        ("L40S", 362.1),
        ("L4", 121.0),
        ("A10G", 70.0),
    ]
    .iter()
    .find(|(k, _)| n.contains(k))
    .map(|&(_, v)| v)
}

/// Timing of queued device work, per backend.
pub trait OpTimer: BackwardOps {
    /// Milliseconds of each of `reps` runs of `f` (after one untimed warm-up run).
    fn time_ms(&self, f: &mut dyn FnMut(), reps: usize) -> Result<Vec<f64>>;
    /// Measured copy bandwidth in GB/s (bytes read + bytes written per second).
    fn bandwidth_gbs(&self) -> Result<f64>;
    /// Peak FLOP/s in TFLOP/s and where the figure comes from.
    fn peak_tflops(&self) -> Option<(f64, String)>;
    /// The vendor GEMM timed next to the projection GEMMs: `None` when this build has none,
    /// else its name and version, or why it cannot run here.
    fn vendor_gemm(&self) -> Option<std::result::Result<String, String>> {
        None
    }
    /// `out[m, n] = x[m, k] w[n, k]^T` through the vendor GEMM (called only when
    /// `vendor_gemm` named one).
    fn vendor_matmul(
        &self,
        _x: &Self::Buf,
        _w: &Self::Buf,
        _out: &mut Self::Buf,
        _m: usize,
        _n: usize,
        _k: usize,
    ) -> Result<()> {
        anyhow::bail!("this backend has no vendor GEMM")
    }
    /// Other kernels of this backend that can run `a [m, k] b[n, k]^T` (`trans_b`, the
    /// projection) or `a [m, k] b [k, n]` (the backward's dX), each timed as a row of its own
    /// next to the one the dispatch picks: the rows' labels.
    fn alternative_gemms(
        &self,
        _m: usize,
        _n: usize,
        _k: usize,
        _trans_b: bool,
    ) -> Vec<&'static str> {
        Vec::new()
    }
    /// Whether the backend has a general SIMT GEMM that the thin-side and split-f32 products
    /// used to run ([`OpTimer::simt_gemm`]), to time next to them.
    fn has_simt_gemm(&self) -> bool {
        false
    }
    /// `gemm`'s contract (scale 1) through that SIMT kernel.
    #[allow(clippy::too_many_arguments)]
    fn simt_gemm(
        &self,
        _a: &Self::Buf,
        _b: &Self::Buf,
        _out: &mut Self::Buf,
        _m: usize,
        _n: usize,
        _k: usize,
        _trans_a: bool,
        _trans_b: bool,
        _accumulate: bool,
    ) {
        unreachable!("has_simt_gemm said there is none")
    }
    /// Runs kernel `which` of `alternative_gemms`.
    #[allow(clippy::too_many_arguments)]
    fn run_alternative_gemm(
        &self,
        _which: usize,
        _a: &Self::Buf,
        _b: &Self::Buf,
        _out: &mut Self::Buf,
        _m: usize,
        _n: usize,
        _k: usize,
        _trans_b: bool,
    ) {
        unreachable!("alternative_gemms named no kernel")
    }
}

impl OpTimer for CpuBackend {
    fn time_ms(&self, f: &mut dyn FnMut(), reps: usize) -> Result<Vec<f64>> {
        f();
        Ok((0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect())
    }
    fn bandwidth_gbs(&self) -> Result<f64> {
        Ok(crate::bench::measure_read_bandwidth())
    }
    fn peak_tflops(&self) -> Option<(f64, String)> {
        let p = crate::bench::measure_fma_peak();
        Some((
            p.gflops / 1e3,
            format!("measured f32 FMA peak, {} threads, {}", p.threads, p.isa),
        ))
    }
}

#[cfg(feature = "cuda")]
impl OpTimer for crate::backend::cuda::CudaBackend {
    fn time_ms(&self, f: &mut dyn FnMut(), reps: usize) -> Result<Vec<f64>> {
        self.time_ms_flushed(f, reps)
    }
    fn bandwidth_gbs(&self) -> Result<f64> {
        self.copy_bandwidth_gbs()
    }
    fn peak_tflops(&self) -> Option<(f64, String)> {
        let name = crate::backend::Backend::name(self);
        known_peak_tflops(&name).map(|p| (p, format!("bf16 dense peak of {name} (data sheet)")))
    }
    /// Where a Hopper GEMM runs, the kernels it replaced: the 128x128 wgmma kernel (for the TMA
    /// kernel) and the sm_80 mma.sync kernel.
    fn alternative_gemms(&self, m: usize, n: usize, k: usize, trans_b: bool) -> Vec<&'static str> {
        cuda_alternatives(self, m, n, k, trans_b)
            .into_iter()
            .map(|(label, _)| label)
            .collect()
    }
    fn run_alternative_gemm(
        &self,
        which: usize,
        a: &Self::Buf,
        b: &Self::Buf,
        out: &mut Self::Buf,
        m: usize,
        n: usize,
        k: usize,
        trans_b: bool,
    ) {
        let (_, kernel) = cuda_alternatives(self, m, n, k, trans_b)[which];
        self.gemm_using(kernel, a, b, out, m, n, k, false, trans_b, 1.0, false)
    }
    fn has_simt_gemm(&self) -> bool {
        true
    }
    fn simt_gemm(
        &self,
        a: &Self::Buf,
        b: &Self::Buf,
        out: &mut Self::Buf,
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        accumulate: bool,
    ) {
        use crate::backend::cuda::GemmKernel;
        self.gemm_using(
            GemmKernel::Generic,
            a,
            b,
            out,
            m,
            n,
            k,
            trans_a,
            trans_b,
            1.0,
            accumulate,
        )
    }
    #[cfg(feature = "cublaslt")]
    fn vendor_gemm(&self) -> Option<std::result::Result<String, String>> {
        Some(
            self.cublaslt_version()
                .map(|v| format!("cuBLASLt {v}"))
                .map_err(|e| format!("{e:#}")),
        )
    }
    #[cfg(feature = "cublaslt")]
    fn vendor_matmul(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        out: &mut Self::Buf,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        self.matmul_cublaslt(x, w, out, m, n, k)
    }
}

/// One timed op.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub op: String,
    pub shape: String,
    pub ms: f64,
    pub flops: f64,
    pub bytes: f64,
    /// Max of flops / peak and bytes / bandwidth, in ms.
    pub floor_ms: f64,
    pub torch_ms: Option<f64>,
    /// The same GEMM through cuBLASLt (built with the `cublaslt` feature; projection GEMMs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cublaslt_ms: Option<f64>,
}

struct Case<'a> {
    op: &'static str,
    shape: String,
    flops: f64,
    bytes: f64,
    run: Box<dyn FnMut() + 'a>,
    /// The same op through the vendor library, on the same buffers (projection GEMMs).
    vendor: Option<Box<dyn FnMut() -> Result<()> + 'a>>,
}

/// A thin or split product's row: (its label, the label of the SIMT row before it), shape,
/// operands (a, b), out, (m, n, k, trans_a, trans_b, accumulate), bytes.
type ThinCase<T> = (
    (&'static str, &'static str),
    String,
    (T, T),
    T,
    (usize, usize, usize, bool, bool, bool),
    f64,
);

/// A GEMM's operands and output, shared by the rows that time it.
type Operands<'b, T> = (&'b Rc<T>, &'b Rc<T>, &'b Rc<RefCell<T>>);

/// The CUDA backend's other kernels for a GEMM the dispatch gives to a Hopper kernel: the
/// 128x128 wgmma kernel where the TMA kernel runs, and the sm_80 mma.sync kernel where either
/// wgmma kernel runs. Labels and kernels (`gemm_using`'s, `Projection` for `b^T`).
#[cfg(feature = "cuda")]
fn cuda_alternatives(
    be: &crate::backend::cuda::CudaBackend,
    m: usize,
    n: usize,
    k: usize,
    trans_b: bool,
) -> Vec<(&'static str, crate::backend::cuda::GemmKernel)> {
    use crate::backend::cuda::{DType, GemmKernel, MatmulKernel};
    let bf16 = DType::BF16;
    let mut out = Vec::new();
    if trans_b {
        let picked = be.matmul_kernel(m, n, k, bf16, bf16);
        if picked == MatmulKernel::WgmmaTma128x256 {
            out.push((
                "matmul square, wgmma 128x128 (cp.async, no producer warp)",
                GemmKernel::Projection(MatmulKernel::Wgmma128),
            ));
        }
        if matches!(
            picked,
            MatmulKernel::WgmmaTma128x256 | MatmulKernel::Wgmma128
        ) {
            out.push((
                "matmul square, mma.sync (sm_80 kernel)",
                GemmKernel::Projection(MatmulKernel::TensorCore128),
            ));
        }
    } else {
        let picked = be.gemm_kernel(m, n, k, false, false, bf16, bf16);
        if picked == GemmKernel::WgmmaTmaNn128x256 {
            out.push((
                "gemm dX = dY W (down), wgmma 128x128 (cp.async, no producer warp)",
                GemmKernel::WgmmaNn128,
            ));
        }
        if matches!(
            picked,
            GemmKernel::WgmmaTmaNn128x256 | GemmKernel::WgmmaNn128
        ) {
            out.push((
                "gemm dX = dY W (down), mma.sync (sm_80 kernel)",
                GemmKernel::TensorCoreNn128,
            ));
        }
    }
    out
}

/// The rows of `OpTimer::alternative_gemms`' kernels for `a [m, k] op(b)` (`b^T` when
/// `trans_b`), on the buffers of the row they follow; none when the backend has no other kernel
/// for it.
fn alternative_cases<'a, B: OpTimer>(
    be: &'a B,
    (a, b, out): Operands<'_, B::Buf>,
    (m, n, k): (usize, usize, usize),
    trans_b: bool,
    shape: &str,
    (flops, bytes): (f64, f64),
) -> Vec<Case<'a>> {
    let labels = be.alternative_gemms(m, n, k, trans_b);
    labels
        .into_iter()
        .enumerate()
        .map(|(which, op)| {
            let (a, b, out) = (a.clone(), b.clone(), out.clone());
            Case {
                op,
                shape: shape.to_string(),
                flops,
                bytes,
                run: Box::new(move || {
                    let out = &mut out.borrow_mut();
                    be.run_alternative_gemm(which, &a, &b, out, m, n, k, trans_b)
                }),
                vendor: None,
            }
        })
        .collect()
}

fn random(n: usize, rng: &mut Rng, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * scale).collect()
}

/// The ops at `cfg`'s shape, `t` token rows, decode over `ctx` cached keys. `wb` is the
/// storage size of the working dtype (2 for bf16 on the GPU, 4 on the CPU); `vendor`: also
/// time the projection GEMMs through `OpTimer::vendor_matmul`.
fn cases<'a, B: OpTimer>(
    be: &'a B,
    cfg: &ModelConfig,
    t: usize,
    ctx: usize,
    wb: f64,
    vendor: bool,
) -> Result<Vec<Case<'a>>> {
    let mut rng = Rng::new(7);
    let (d, ff, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
    let (qd, kvd) = (nh * hd, nkv * hd);
    let mut out: Vec<Case<'a>> = Vec::new();
    let up = |n: usize, rng: &mut Rng| be.upload(&random(n, rng, 1.0));

    // Embedding gather.
    {
        let table = up(v * d, &mut rng)?;
        let ids: Vec<u32> = (0..t).map(|i| ((i * 7919) % v) as u32).collect();
        let mut o = be.alloc(t * d)?;
        out.push(Case {
            op: "embedding",
            shape: format!("{t} ids x {d}"),
            flops: 0.0,
            bytes: 2.0 * (t * d) as f64 * wb,
            run: Box::new(move || be.embedding(&table, &ids, d, &mut o)),
            vendor: None,
        });
    }
    // Norms.
    {
        let x = up(t * d, &mut rng)?;
        let w = be.upload_f32(&random(d, &mut rng, 1.0))?;
        let mut o = be.alloc(t * d)?;
        out.push(Case {
            op: "rmsnorm",
            shape: format!("[{t}, {d}]"),
            flops: 4.0 * (t * d) as f64,
            bytes: 2.0 * (t * d) as f64 * wb,
            run: Box::new(move || be.rmsnorm(&x, &w, d, 1e-5, &mut o)),
            vendor: None,
        });
        // The model's residual stream is f32 (llama::forward::clone_f32): the residual read
        // and written and the projection output added to it in f32, the normed row written in
        // the working precision.
        let mut res = be.upload_f32(&random(t * d, &mut rng, 1.0))?;
        let delta = be.upload_f32(&random(t * d, &mut rng, 1.0))?;
        let w = be.upload_f32(&random(d, &mut rng, 1.0))?;
        let mut o = be.alloc(t * d)?;
        out.push(Case {
            op: "add_rmsnorm",
            shape: format!("[{t}, {d}] f32 residual"),
            flops: 5.0 * (t * d) as f64,
            bytes: (12.0 + wb) * (t * d) as f64,
            run: Box::new(move || be.add_rmsnorm(&mut res, &delta, &w, d, 1e-5, &mut o)),
            vendor: None,
        });
    }
    // Projection GEMMs (x w^T), the decode GEMV, and a square GEMM.
    // The square GEMM of the cuBLAS comparison: 4096^3 at 7B/8B shapes, smaller for small ones.
    let sq = (4 * d).clamp(64, 4096);
    let gemms: [(&'static str, usize, usize, usize); 6] = [
        ("matmul qkv", t, qd + 2 * kvd, d),
        ("matmul o", t, d, qd),
        ("matmul gate+up", t, 2 * ff, d),
        ("matmul down", t, d, ff),
        ("matvec down (decode)", 1, d, ff),
        ("matmul square", sq, sq, sq),
    ];
    for (op, m, n, k) in gemms {
        // Shared, so that the vendor GEMM reads and writes the very same buffers.
        let x = Rc::new(up(m * k, &mut rng)?);
        let w = Rc::new(be.upload(&random(n * k, &mut rng, 0.02))?);
        let o = Rc::new(RefCell::new(be.alloc(m * n)?));
        let vendor = vendor.then(|| {
            let (x, w, o) = (x.clone(), w.clone(), o.clone());
            Box::new(move || be.vendor_matmul(&x, &w, &mut o.borrow_mut(), m, n, k))
                as Box<dyn FnMut() -> Result<()> + 'a>
        });
        let shape = format!("[{m}, {k}] x [{n}, {k}]^T");
        let (flops, bytes) = (
            2.0 * (m * n * k) as f64,
            ((m * k + n * k + m * n) as f64) * wb,
        );
        // The square GEMM also through the backend's other kernels, on the same buffers.
        let alternative = if op == "matmul square" {
            alternative_cases(be, (&x, &w, &o), (m, n, k), true, &shape, (flops, bytes))
        } else {
            Vec::new()
        };
        out.push(Case {
            op,
            shape,
            flops,
            bytes,
            run: Box::new(move || be.matmul(&x, &w, &mut o.borrow_mut(), m, n, k, 1.0, false)),
            vendor,
        });
        out.extend(alternative);
    }
    // The decode step's q, k and v projections as one op (`Backend::qkv_proj`: one launch on
    // the CUDA decode path, three elsewhere).
    {
        let x = up(d, &mut rng)?;
        let ns = [qd, kvd, kvd];
        let ws = ns
            .iter()
            .map(|&n| be.upload(&random(n * d, &mut rng, 0.02)))
            .collect::<Result<Vec<_>>>()?;
        let mut outs = ns
            .iter()
            .map(|&n| be.alloc(n))
            .collect::<Result<Vec<_>>>()?;
        let n = qd + 2 * kvd;
        out.push(Case {
            op: "matvec qkv (decode)",
            shape: format!("[1, {d}] x [{qd} + {kvd} + {kvd}, {d}]^T"),
            flops: 2.0 * (n * d) as f64,
            bytes: ((d + n * d + n) as f64) * wb,
            run: Box::new(move || {
                let [q, k, v] = &mut outs[..] else {
                    unreachable!("three outputs")
                };
                be.qkv_proj(&x, [&ws[0], &ws[1], &ws[2]], [None; 3], [q, k, v], 1, ns, d)
            }),
            vendor: None,
        });
    }
    // The backward's dX = dY W through the down projection (W [d, ff]).
    // Where a Hopper kernel runs it, the sm_80 kernel too, on the same buffers.
    {
        let (m, n, k) = (t, ff, d);
        let dy = Rc::new(up(m * k, &mut rng)?);
        let w = Rc::new(be.upload(&random(k * n, &mut rng, 0.02))?);
        let dx = Rc::new(RefCell::new(be.alloc(m * n)?));
        let shape = format!("[{m}, {k}] x [{k}, {n}]");
        let (flops, bytes) = (
            2.0 * (m * n * k) as f64,
            ((m * k + n * k + m * n) as f64) * wb,
        );
        let alternative =
            alternative_cases(be, (&dy, &w, &dx), (m, n, k), false, &shape, (flops, bytes));
        out.push(Case {
            op: "gemm dX = dY W (down)",
            shape,
            flops,
            bytes,
            run: Box::new(move || {
                be.gemm(
                    &dy,
                    &w,
                    &mut dx.borrow_mut(),
                    m,
                    n,
                    k,
                    false,
                    false,
                    1.0,
                    false,
                )
            }),
            vendor: None,
        });
        out.extend(alternative);
    }
    // A rank-16 LoRA pair's GEMMs on the q projection (factors in f32, one thin side): the
    // forward's x A^T, the backward's dY B and dA += (dY B)^T x, and x A^T at decode; then the
    // f32 logits gradient (retain KL, the attack's CE) back through lm_head, dX = dZ W. Each
    // with the general SIMT kernel it used to take on the same buffers, where there is one.
    {
        let r = 16;
        let rows = t.min(1024);
        let f32_bytes = |n: usize| (n * 4) as f64;
        let thin: [ThinCase<B::Buf>; 5] = [
            (
                (
                    "matmul lora x A^T",
                    "matmul lora x A^T, 64x64 SIMT (before)",
                ),
                format!("[{t}, {d}] x [{r}, {d}]^T f32"),
                (
                    up(t * d, &mut rng)?,
                    be.upload_f32(&random(r * d, &mut rng, 0.02))?,
                ),
                be.alloc(t * r)?,
                (t, r, d, false, true, false),
                (t * d + t * r) as f64 * wb + f32_bytes(r * d),
            ),
            (
                ("gemm lora dY B", "gemm lora dY B, 64x64 SIMT (before)"),
                format!("[{t}, {qd}] x [{qd}, {r}] f32"),
                (
                    up(t * qd, &mut rng)?,
                    be.upload_f32(&random(qd * r, &mut rng, 0.02))?,
                ),
                be.alloc(t * r)?,
                (t, r, qd, false, false, false),
                (t * qd + t * r) as f64 * wb + f32_bytes(qd * r),
            ),
            (
                (
                    "gemm lora dA += (dY B)^T x",
                    "gemm lora dA += (dY B)^T x, 64x64 SIMT (before)",
                ),
                format!("[{t}, {r}]^T x [{t}, {d}] -> f32"),
                (up(t * r, &mut rng)?, up(t * d, &mut rng)?),
                be.alloc_f32(r * d)?,
                (r, d, t, true, false, true),
                (t * r + t * d) as f64 * wb + f32_bytes(2 * r * d),
            ),
            (
                (
                    "matmul lora x A^T (decode)",
                    "matmul lora x A^T (decode), 64x64 SIMT (before)",
                ),
                format!("[1, {d}] x [{r}, {d}]^T f32"),
                (
                    up(d, &mut rng)?,
                    be.upload_f32(&random(r * d, &mut rng, 0.02))?,
                ),
                be.alloc(r)?,
                (1, r, d, false, true, false),
                (d + r) as f64 * wb + f32_bytes(r * d),
            ),
            (
                (
                    "gemm lm_head dX = dZ W (f32 dZ)",
                    "gemm lm_head dX = dZ W (f32 dZ), 64x64 SIMT (before)",
                ),
                format!("[{rows}, {v}] f32 x [{v}, {d}]"),
                (
                    be.upload_f32(&random(rows * v, &mut rng, 1e-3))?,
                    up(v * d, &mut rng)?,
                ),
                be.alloc(rows * d)?,
                (rows, d, v, false, false, false),
                f32_bytes(rows * v) + (v * d + rows * d) as f64 * wb,
            ),
        ];
        for ((op, before), shape, (a, b), o, dims, bytes) in thin {
            let (m, n, k, ta, tb, acc) = dims;
            let (a, b, o) = (Rc::new(a), Rc::new(b), Rc::new(RefCell::new(o)));
            let flops = 2.0 * (m * n * k) as f64;
            let operands = (a.clone(), b.clone(), o.clone());
            out.push(Case {
                op,
                shape: shape.clone(),
                flops,
                bytes,
                // x w^T through `matmul` (its decode GEMV), the rest through `gemm`.
                run: Box::new(move || {
                    let (a, b, o) = (&operands.0, &operands.1, &mut operands.2.borrow_mut());
                    if tb {
                        be.matmul(a, b, o, m, n, k, 1.0, acc)
                    } else {
                        be.gemm(a, b, o, m, n, k, ta, tb, 1.0, acc)
                    }
                }),
                vendor: None,
            });
            if be.has_simt_gemm() {
                out.push(Case {
                    op: before,
                    shape,
                    flops,
                    bytes,
                    run: Box::new(move || {
                        be.simt_gemm(&a, &b, &mut o.borrow_mut(), m, n, k, ta, tb, acc)
                    }),
                    vendor: None,
                });
            }
        }
    }
    // RoPE on q, SwiGLU and its backward.
    {
        let mut q = up(t * qd, &mut rng)?;
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| cfg.rope_theta.powf(-2.0 * i as f32 / hd as f32))
            .collect();
        let inv = be.upload_f32(&inv)?;
        out.push(Case {
            op: "rope (q)",
            shape: format!("[{t}, {nh} x {hd}]"),
            flops: 3.0 * (t * qd) as f64,
            bytes: 2.0 * (t * qd) as f64 * wb,
            run: Box::new(move || be.rope(&mut q, 1, t, nh, hd, 0, &inv)),
            vendor: None,
        });
        let g = up(t * ff, &mut rng)?;
        let u = up(t * ff, &mut rng)?;
        let mut o = be.alloc(t * ff)?;
        out.push(Case {
            op: "swiglu",
            shape: format!("[{t}, {ff}]"),
            flops: 6.0 * (t * ff) as f64,
            bytes: 3.0 * (t * ff) as f64 * wb,
            run: Box::new(move || be.swiglu(&g, &u, &mut o)),
            vendor: None,
        });
        let (g, u, dout) = (
            up(t * ff, &mut rng)?,
            up(t * ff, &mut rng)?,
            up(t * ff, &mut rng)?,
        );
        let (mut dg, mut du) = (be.alloc(t * ff)?, be.alloc(t * ff)?);
        out.push(Case {
            op: "swiglu_bwd",
            shape: format!("[{t}, {ff}]"),
            flops: 10.0 * (t * ff) as f64,
            bytes: 5.0 * (t * ff) as f64 * wb,
            run: Box::new(move || be.swiglu_bwd(&g, &u, &dout, &mut dg, &mut du)),
            vendor: None,
        });
        let (x, dy) = (up(t * d, &mut rng)?, up(t * d, &mut rng)?);
        let w = be.upload_f32(&random(d, &mut rng, 1.0))?;
        let mut dx = be.alloc(t * d)?;
        out.push(Case {
            op: "rmsnorm_bwd",
            shape: format!("[{t}, {d}]"),
            flops: 8.0 * (t * d) as f64,
            bytes: 3.0 * (t * d) as f64 * wb,
            run: Box::new(move || be.rmsnorm_bwd(&x, &w, &dy, d, 1e-5, &mut dx, false)),
            vendor: None,
        });
    }
    // Attention: causal prefill over one sequence of t tokens, its backward, and decode.
    {
        let s = AttnShape {
            batch: 1,
            q_len: t,
            start_pos: 0,
            capacity: t,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
        };
        let (q, k, vv) = (
            up(t * qd, &mut rng)?,
            up(t * kvd, &mut rng)?,
            up(t * kvd, &mut rng)?,
        );
        let mut o = be.alloc(t * qd)?;
        // QK^T and PV over the causal half.
        let flops = 2.0 * 2.0 * (nh * hd) as f64 * (t * (t + 1) / 2) as f64;
        let bytes = ((2 * t * qd + 2 * t * kvd) as f64) * wb;
        out.push(Case {
            op: "attention prefill",
            shape: format!("1 x {t} tokens, {nh}/{nkv} heads x {hd}"),
            flops,
            bytes,
            run: Box::new(move || be.attention(&q, &k, &vv, None, &mut o, s)),
            vendor: None,
        });
        let (q, k, vv) = (
            up(t * qd, &mut rng)?,
            up(t * kvd, &mut rng)?,
            up(t * kvd, &mut rng)?,
        );
        let mut o = be.alloc(t * qd)?;
        be.attention(&q, &k, &vv, None, &mut o, s);
        let dout = up(t * qd, &mut rng)?;
        let (mut dq, mut dk, mut dv) = (be.alloc(t * qd)?, be.alloc(t * kvd)?, be.alloc(t * kvd)?);
        out.push(Case {
            op: "attention_bwd",
            shape: format!("1 x {t} tokens, {nh}/{nkv} heads x {hd}"),
            // The trait's backward recomputes the forward for its lse: 1 + 2.5 forwards.
            flops: 3.5 * flops,
            bytes: bytes * 2.5,
            run: Box::new(move || {
                be.attention_bwd(&q, &k, &vv, None, &o, &dout, &mut dq, &mut dk, &mut dv, s)
            }),
            vendor: None,
        });
        let sd = AttnShape {
            batch: 1,
            q_len: 1,
            start_pos: ctx - 1,
            capacity: ctx,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
        };
        let (q, k, vv) = (
            up(qd, &mut rng)?,
            up(ctx * kvd, &mut rng)?,
            up(ctx * kvd, &mut rng)?,
        );
        let mut o = be.alloc(qd)?;
        out.push(Case {
            op: "attention decode",
            shape: format!("1 query, {ctx} cached keys"),
            flops: 4.0 * (nh * hd * ctx) as f64,
            bytes: (2 * ctx * kvd) as f64 * wb,
            run: Box::new(move || be.attention(&q, &k, &vv, None, &mut o, sd)),
            vendor: None,
        });
    }
    // Retain KL and the attack's target CE over f32 logits, and AdamW over a rank-16 LoRA of
    // every projection.
    {
        let rows = t.min(1024);
        let (zo, zt) = (
            be.upload_f32(&random(rows * v, &mut rng, 2.0))?,
            be.upload_f32(&random(rows * v, &mut rng, 2.0))?,
        );
        let mut g = be.alloc_f32(rows * v)?;
        let mask = vec![1.0f64; rows];
        out.push(Case {
            op: "kl_retain (+ grad)",
            shape: format!("[{rows}, {v}] f32"),
            flops: 12.0 * (rows * v) as f64,
            bytes: 5.0 * (rows * v) as f64 * 4.0,
            run: Box::new(move || {
                be.kl_retain(&zo, &zt, &mask, 1, v, 2.0, 1.0, Some(&mut g))
                    .expect("kl_retain");
            }),
            vendor: None,
        });
        // The attack's target CE over one sequence's logits: the last quarter of the rows (at
        // most 32) are targets.
        let nt = (rows / 4).clamp(1, 32);
        let z = be.upload_f32(&random(rows * v, &mut rng, 2.0))?;
        let mut dz = be.alloc_f32(rows * v)?;
        let targets: Vec<(usize, u32)> = (rows - nt..rows)
            .map(|r| (r, (r * 7919 % v) as u32))
            .collect();
        out.push(Case {
            op: "target_ce (+ grad)",
            shape: format!("[{rows}, {v}] f32, {nt} targets"),
            flops: 8.0 * (nt * v) as f64,
            // The zeroed gradient, two reads of the target rows and their gradient rows.
            bytes: (rows + 3 * nt) as f64 * v as f64 * 4.0,
            run: Box::new(move || {
                be.target_ce(&z, v, &[&targets], Some(&mut dz))
                    .expect("target_ce");
            }),
            vendor: None,
        });
        // Rank 16 on all seven projections of every layer: r (fan_in + fan_out) each.
        let n = 16 * cfg.num_layers * (7 * d + 2 * qd + 2 * kvd + 3 * ff);
        let mut p = be.upload_f32(&random(n, &mut rng, 0.02))?;
        let g = be.upload_f32(&random(n, &mut rng, 1e-3))?;
        let (mut m, mut vv) = (be.alloc_f32(n)?, be.alloc_f32(n)?);
        let adam = AdamWConfig::default();
        out.push(Case {
            op: "adamw",
            shape: format!("{n} f32 parameters"),
            flops: 12.0 * n as f64,
            bytes: 7.0 * n as f64 * 4.0,
            run: Box::new(move || be.adamw_step(&adam, 1, &mut p, &g, 1.0, &mut m, &mut vv)),
            vendor: None,
        });
    }
    Ok(out)
}

fn run_on<B: OpTimer>(be: &B, a: &KernelsArgs, cfg: &ModelConfig, wb: f64) -> Result<Vec<Row>> {
    let bw = be.bandwidth_gbs()?;
    let peak = a
        .peak_tflops
        .map(|p| (p, "--peak-tflops".to_string()))
        .or_else(|| be.peak_tflops());
    println!("# repshield bench kernels: {} on {}", a.shape, be.name());
    println!(
        "tokens {}, decode over {} cached keys, median of {} after a warm-up; bandwidth {bw:.0} GB/s (measured copy); peak {}",
        a.tokens,
        a.ctx,
        a.repeats,
        match &peak {
            Some((p, src)) => format!("{p:.1} TFLOP/s ({src})"),
            None => "unknown (pass --peak-tflops; floors use bandwidth only)".into(),
        }
    );
    let vendor = match be.vendor_gemm() {
        Some(Ok(name)) => {
            println!("{name}: each projection GEMM also timed through it, on the same buffers, the same way");
            true
        }
        Some(Err(why)) => {
            println!("{why} (no cuBLASLt column)");
            false
        }
        None => false,
    };
    let filter: Vec<String> = a
        .only
        .as_deref()
        .map(|s| s.split(',').map(|x| x.trim().to_string()).collect())
        .unwrap_or_default();
    let mut rows = Vec::new();
    for mut c in cases(be, cfg, a.tokens, a.ctx, wb, vendor)? {
        if !filter.is_empty() && !filter.iter().any(|f| c.op.contains(f.as_str())) {
            continue;
        }
        let times = be.time_ms(&mut *c.run, a.repeats)?;
        be.synchronize()?;
        let ms = median(&times);
        let cublaslt_ms = match c.vendor.as_mut() {
            None => None,
            Some(run) => {
                let mut err = None;
                let times = be.time_ms(
                    &mut || {
                        if let Err(e) = run() {
                            err.get_or_insert(e);
                        }
                    },
                    a.repeats,
                )?;
                be.synchronize()?;
                match err {
                    // A failing comparison loses only its own cell.
                    Some(e) => {
                        eprintln!("{}: the cuBLASLt run failed: {e:#}", c.op);
                        None
                    }
                    None => Some(median(&times)),
                }
            }
        };
        let floor_ms =
            (c.bytes / (bw * 1e9)).max(peak.as_ref().map_or(0.0, |p| c.flops / (p.0 * 1e12))) * 1e3;
        rows.push(Row {
            op: c.op.to_string(),
            shape: c.shape,
            ms,
            flops: c.flops,
            bytes: c.bytes,
            floor_ms,
            torch_ms: None,
            cublaslt_ms,
        });
    }
    Ok(rows)
}

/// `ms` and how many times faster than it ours is (`other / ours`), or dashes.
fn versus(other: Option<f64>, ours: f64) -> (String, String) {
    match other {
        Some(t) => (format!("{t:.4}"), format!("{:.2}x", t / ours)),
        None => ("-".into(), "-".into()),
    }
}

fn print_rows(rows: &[Row]) {
    // The cuBLASLt columns only when the `cublaslt` build measured something.
    let lt = rows.iter().any(|r| r.cublaslt_ms.is_some());
    let (lt_head, lt_rule) = if lt {
        (" cuBLASLt ms | vs cuBLASLt |", "---|---|")
    } else {
        ("", "")
    };
    println!();
    println!("| op | shape | ms (median) | TFLOP/s | GB/s | floor ms | of floor | PyTorch ms | vs PyTorch |{lt_head}");
    println!("|---|---|---|---|---|---|---|---|---|{lt_rule}");
    for r in rows {
        let s = r.ms / 1e3;
        let tflops = if r.flops > 0.0 {
            format!("{:.2}", r.flops / s / 1e12)
        } else {
            "-".into()
        };
        let (tm, ratio) = versus(r.torch_ms, r.ms);
        let lt_cells = if lt {
            let (m, x) = versus(r.cublaslt_ms, r.ms);
            format!(" {m} | {x} |")
        } else {
            String::new()
        };
        println!(
            "| {} | {} | {:.4} | {tflops} | {:.0} | {:.4} | {:.0}% | {tm} | {ratio} |{lt_cells}",
            r.op,
            r.shape,
            r.ms,
            r.bytes / s / 1e9,
            r.floor_ms,
            100.0 * r.floor_ms / r.ms,
        );
    }
}

pub fn bench_kernels(a: &KernelsArgs) -> Result<()> {
    ensure!(
        a.repeats > 0 && a.tokens > 0 && a.ctx > 0,
        "--repeats, --tokens and --ctx must be positive"
    );
    let cfg = shape_config(&a.shape)?;
    let mut rows = if crate::backend::cuda::pick_device(&a.device)? {
        #[cfg(feature = "cuda")]
        {
            let be = crate::backend::cuda::CudaBackend::new(0)?;
            run_on(&be, a, &cfg, 2.0)?
        }
        #[cfg(not(feature = "cuda"))]
        unreachable!("pick_device never chooses CUDA without the feature")
    } else {
        crate::backend::cpu::on_pool(|| run_on(&CpuBackend, a, &cfg, 4.0))?
    };
    if let Some(py) = &a.compare_python {
        let names: Vec<&str> = rows.iter().map(|r| r.op.as_str()).collect();
        let v = match run_python_json(
            py,
            a.script.as_ref(),
            "bench_kernels_torch.py",
            &cfg,
            0,
            &[
                ("--tokens", a.tokens.to_string()),
                ("--ctx", a.ctx.to_string()),
                ("--repeats", a.repeats.to_string()),
                ("--ops", names.join(";")),
            ],
        ) {
            Ok(v) => v,
            // A failing comparison loses only its own column.
            Err(e) => {
                eprintln!("the PyTorch comparison failed: {e:#}");
                serde_json::Value::Null
            }
        };
        for r in &mut rows {
            r.torch_ms = v.get(&r.op).and_then(|x| x.as_f64());
        }
    }
    print_rows(&rows);
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&rows)?)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", p.display()))?;
    }
    Ok(())
}
