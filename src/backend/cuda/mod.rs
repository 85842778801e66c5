//! The CUDA backend: hand-written kernels (kernels/*.cu, compiled to PTX by build.rs and
//! embedded in the binary) launched through cudarc, one launcher file per kernel file.
//!
//! Buffers carry their storage dtype: `upload`/`alloc` give bf16 (frozen weights, activations,
//! KV cache), `upload_f32`/`alloc_f32` give f32 (norm weights, biases, rope inv_freq, masks,
//! LoRA factors, logits). Kernels accumulate in f32 whatever the storage.
//!
//! Everything here compiles without CUDA installed: with the `cuda` feature off only the
//! memory planner and [`unavailable_reason`] exist; with it on, the driver is loaded at run
//! time and [`CudaBackend::new`] returns an error (never panics) when there is no driver, no
//! GPU, or no compiled kernels.

pub mod plan;
pub use plan::MemoryPlan;

/// The PTX that build.rs compiled from kernels/*.cu.
pub mod ptx {
    /// One kernels/*.cu file: its PTX text and the `extern "C"` entry points in it, each with
    /// its parameter signature (one letter per parameter: `p` 8-byte pointer or long long,
    /// `i` 32-bit int, `f` f32, `d` f64).
    #[derive(Debug, Clone, Copy)]
    pub struct PtxModule {
        pub name: &'static str,
        /// The PTX target: `compute_80` (every GPU the backend supports) or `compute_90a`
        /// (Hopper only: `*_sm90.cu` files, loaded on compute capability 9.0).
        pub target: &'static str,
        pub ptx: &'static str,
        pub entries: &'static [(&'static str, &'static str)],
    }
    include!(concat!(env!("OUT_DIR"), "/kernels_ptx.rs"));
}

#[cfg(feature = "cuda")]
mod adamw;
#[cfg(feature = "cuda")]
mod attention;
#[cfg(feature = "cuda")]
mod capture;
#[cfg(feature = "cuda")]
mod ce;
#[cfg(feature = "cublaslt")]
mod cublaslt;
#[cfg(feature = "cuda")]
mod dropout;
#[cfg(feature = "cuda")]
mod embedding;
#[cfg(feature = "cuda")]
mod graph;
#[cfg(feature = "cuda")]
mod kl;
#[cfg(feature = "cuda")]
mod matmul;
#[cfg(feature = "cuda")]
mod pgd;
#[cfg(feature = "cuda")]
mod rmsnorm;
#[cfg(feature = "cuda")]
mod rope;
#[cfg(feature = "cuda")]
mod rows;
#[cfg(feature = "cuda")]
mod sampling;
#[cfg(feature = "cuda")]
mod swiglu;

#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
pub use attention::AttentionPlan;
#[cfg(feature = "cuda")]
pub use device::{ArenaUse, CudaBackend, CudaBuf, DType};
#[cfg(feature = "cuda")]
pub use graph::{StepChoice, StepGraph, StepState};
#[cfg(feature = "cuda")]
pub use matmul::{thin_tile, GemmKernel, MatmulKernel, ThinTile, MATVEC_MAX_M};

/// Every entry point the launchers may ask for (the `_{dtype}` variants spelled out); a test
/// checks each against the embedded PTX, so a renamed kernel fails without a GPU.
pub const KERNEL_ENTRIES: &[&str] = &[
    "embedding_bf16",
    "embedding_f32",
    "embedding_bf16_f32",
    "embedding_f32_bf16",
    "gather_rows_bf16",
    "gather_rows_f32",
    "gather_rows_bf16_f32",
    "gather_rows_f32_bf16",
    "rmsnorm_bf16",
    "rmsnorm_f32",
    "add_rmsnorm_bf16",
    "add_rmsnorm_f32",
    "rmsnorm_f32_bf16",
    "add_rmsnorm_f32_bf16",
    "matmul_bf16_128x128",
    "matmul_bf16_wgmma_128x128",
    "matmul_bf16_wgmma_tma_128x256",
    "matmul_bf16_64x64",
    "matvec_bf16",
    "matvec_lora_bf16",
    "matvec_qkv_bf16",
    "matvec_swiglu_bf16",
    "matmul_generic",
    "matvec_generic",
    "add_bias_bf16",
    "add_bias_f32",
    "rope_bf16",
    "rope_f32",
    "rope_kv_store_bf16",
    "rope_kv_store_f32",
    "kv_store_bf16",
    "kv_store_f32",
    "attention_bf16_hd32",
    "attention_bf16_hd64",
    "attention_bf16_hd128",
    "attention_bf16_hd256",
    "attention_f32_hd32",
    "attention_f32_hd64",
    "attention_f32_hd128",
    "attention_combine_bf16",
    "attention_combine_f32",
    "swiglu_bf16",
    "swiglu_f32",
    "dropout_bf16",
    "dropout_f32",
    "argmax_bf16",
    "argmax_f32",
    "sample_top_p_bf16",
    "sample_top_p_f32",
    // backward
    "gemm_nn_bf16_wgmma_128x128",
    "gemm_nn_bf16_wgmma_tma_128x256",
    "gemm_nn_bf16_128x128",
    "gemm_nn_bf16_64x64",
    "gemm_generic",
    "gemm_thin_32x16",
    "gemm_thin_16x32",
    "split_f32_bf16",
    "row_stats",
    "row_combine",
    "axpy_bf16",
    "axpy_f32",
    "axpy_bf16_f32",
    "axpy_f32_bf16",
    "rmsnorm_bwd_bf16",
    "rmsnorm_bwd_f32",
    "swiglu_bwd_bf16",
    "swiglu_bwd_f32",
    "rope_bwd_bf16",
    "rope_bwd_f32",
    "embedding_bwd_bf16",
    "embedding_bwd_f32",
    "attention_bwd_prep_bf16",
    "attention_bwd_prep_f32",
    "attention_bwd_dq_bf16_hd32",
    "attention_bwd_dq_bf16_hd64",
    "attention_bwd_dq_bf16_hd128",
    "attention_bwd_dq_bf16_hd256",
    "attention_bwd_dq_f32_hd32",
    "attention_bwd_dq_f32_hd64",
    "attention_bwd_dq_f32_hd128",
    "attention_bwd_dkv_bf16_hd32",
    "attention_bwd_dkv_bf16_hd64",
    "attention_bwd_dkv_bf16_hd128",
    "attention_bwd_dkv_bf16_hd256",
    "attention_bwd_dkv_f32_hd32",
    "attention_bwd_dkv_f32_hd64",
    "attention_bwd_dkv_f32_hd128",
    // optimisers and losses
    "adamw_step",
    "pgd_step",
    "kl_retain",
    "target_ce",
];

/// True when an NVIDIA driver can be loaded and it sees at least one GPU (false without the
/// `cuda` feature). Tests use it to skip; it never creates a context.
pub fn gpu_present() -> bool {
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
    #[cfg(feature = "cuda")]
    {
        // SAFETY: only tries to dlopen libcuda.
        let driver = unsafe { cudarc::driver::sys::is_culib_present() };
        driver && cudarc::driver::CudaContext::device_count().is_ok_and(|n| n > 0)
    }
}

/// Why the CUDA backend cannot run on device 0 here, or `None` when it can: built without the
/// `cuda` feature, kernels not compiled, no driver, or no GPU.
pub fn unavailable_reason() -> Option<String> {
    #[cfg(not(feature = "cuda"))]
    {
        Some("built without the `cuda` feature (cargo build --features cuda)".into())
    }
    #[cfg(feature = "cuda")]
    {
        device::probe(0).err().map(|e| format!("{e:#}"))
    }
}

/// `--device cpu|cuda|auto`: whether to run on CUDA (auto: when a GPU and compiled kernels
/// are present, saying which); `cuda` without them is an error that says why.
pub fn pick_device(device: &str) -> anyhow::Result<bool> {
    Ok(match device {
        "cpu" => false,
        "cuda" => match unavailable_reason() {
            None => true,
            Some(why) => anyhow::bail!("--device cuda: {why}"),
        },
        "auto" => {
            let why = unavailable_reason();
            eprintln!(
                "device: {}",
                why.as_ref()
                    .map_or("cuda".to_string(), |w| format!("cpu (CUDA not used: {w})"))
            );
            why.is_none()
        }
        other => anyhow::bail!("--device {other}: expected cpu, cuda or auto"),
    })
}

/// True when [`CudaBackend::new`]`(0)` can succeed: the `cuda` feature is on, the kernels were
/// compiled, a driver is installed and a GPU is visible.
pub fn cuda_available() -> bool {
    unavailable_reason().is_none()
}
