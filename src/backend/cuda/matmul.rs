//! Launcher of kernels/matmul.cu (CPU twin: backend/cpu/matmul.rs and `CpuBackend::add_bias`).
//! Picks the entry point: the bf16 tensor-core GEMM (two tile sizes), the decode GEMV, or the
//! SIMT kernel for f32 operands and K not a multiple of 8.

use super::device::{
    int, Arg, CudaBackend, CudaBuf, DType, TensorMap, GEMM_128_SMEM, GEMM_NN_128_SMEM,
    GEMM_TMA_SMEM, GEMM_WGMMA_SMEM,
};
use super::swiglu::elementwise_config;
use cudarc::driver::sys;
use cudarc::driver::LaunchConfig;

/// Rows of x up to which the GEMV streams each weight row once for all of them.
pub const MATVEC_MAX_M: usize = 8;

/// Which kernel `matmul` runs for a shape and operand dtypes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MatmulKernel {
    /// Hopper's warpgroup MMA fed by TMA loads from a producer warp, 128x256 tiles
    /// (kernels/matmul_tma_sm90.cu): the large projection GEMMs on compute capability 9.0.
    WgmmaTma128x256,
    /// Hopper's warpgroup MMA (kernels/matmul_sm90.cu), where `TensorCore128` would run on a
    /// GPU of compute capability 9.0.
    Wgmma128,
    TensorCore128,
    TensorCore64,
    Matvec,
    /// The decode GEMV for operands the bf16 one cannot take (f32 LoRA factors, K % 8 != 0).
    MatvecGeneric,
    /// SIMT for a thin side and a long K (the LoRA factors' `x A^T` outside decode).
    Thin(ThinTile),
    Generic,
}

/// The output tile of `gemm_thin_*` (kernels/matmul.cu): 32 rows x 16 columns when the
/// product is thin in N, 16 x 32 when it is thin in M.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThinTile {
    Rows32Cols16,
    Rows16Cols32,
}

impl ThinTile {
    pub fn entry(self) -> &'static str {
        match self {
            ThinTile::Rows32Cols16 => "gemm_thin_32x16",
            ThinTile::Rows16Cols32 => "gemm_thin_16x32",
        }
    }

    fn dims(self) -> (usize, usize) {
        match self {
            ThinTile::Rows32Cols16 => (32, 16),
            ThinTile::Rows16Cols32 => (16, 32),
        }
    }
}

/// The thin-side SIMT kernel for a product the tensor cores cannot take, where it beats the
/// 64x64 SIMT tiles: a side of at most 64 (a LoRA rank) against a K of 128 or more, where the
/// 64x64 tiles would idle most of each tile and give too few blocks, each walking all of K.
pub fn thin_tile(m: usize, n: usize, k: usize) -> Option<ThinTile> {
    (m.min(n) <= 64 && k >= 128).then_some(if n <= m {
        ThinTile::Rows32Cols16
    } else {
        ThinTile::Rows16Cols32
    })
}

impl MatmulKernel {
    pub fn entry(self) -> &'static str {
        match self {
            MatmulKernel::WgmmaTma128x256 => "matmul_bf16_wgmma_tma_128x256",
            MatmulKernel::Wgmma128 => "matmul_bf16_wgmma_128x128",
            MatmulKernel::TensorCore128 => "matmul_bf16_128x128",
            MatmulKernel::TensorCore64 => "matmul_bf16_64x64",
            MatmulKernel::Matvec => "matvec_bf16",
            MatmulKernel::MatvecGeneric => "matvec_generic",
            MatmulKernel::Thin(tile) => tile.entry(),
            MatmulKernel::Generic => "matmul_generic",
        }
    }
}

/// Which kernel `gemm` (the backward's `op(a) op(b)`) runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GemmKernel {
    /// `a b^T` with bf16 operands: the projection GEMM itself (`matmul`'s plan).
    Projection(MatmulKernel),
    /// `a b` with bf16 operands, b `[K, N]` row-major (dX = dY W), on Hopper's warpgroup MMA
    /// fed by TMA loads from a producer warp, 128x256 tiles (kernels/matmul_tma_sm90.cu).
    WgmmaTmaNn128x256,
    /// `a b` with bf16 operands, b `[K, N]` row-major (dX = dY W), on Hopper's warpgroup MMA
    /// (kernels/matmul_sm90.cu, b MN-major), where `TensorCoreNn128` would run on a GPU of
    /// compute capability 9.0.
    WgmmaNn128,
    /// `a b` with bf16 operands, b `[K, N]` row-major (dX = dY W): tensor cores, b read k-major.
    TensorCoreNn128,
    TensorCoreNn64,
    /// What the tensor cores cannot take, with a thin side and a long K (the LoRA factors'
    /// GEMMs and their gradients): SIMT, see [`thin_tile`].
    Thin(ThinTile),
    /// `a b` with one operand f32 and the other bf16 (the f32 logits gradient through
    /// lm_head; a latent adversary's f32 `D`): the f32 one split into bf16 `hi + lo`
    /// (`split_f32_bf16`, 2^-18 relative), then two tensor-core GEMMs (the kernel bf16
    /// operands would get) summed in f32. Takes a transient bf16 pair the size of the split
    /// operand, and an f32 `[m, n]` when out is bf16.
    SplitF32,
    /// Anything else (a transposed, f32 operands, ragged 16-byte chunks): SIMT.
    Generic,
}

impl GemmKernel {
    pub fn entry(self) -> &'static str {
        match self {
            GemmKernel::Projection(kernel) => kernel.entry(),
            GemmKernel::WgmmaTmaNn128x256 => "gemm_nn_bf16_wgmma_tma_128x256",
            GemmKernel::WgmmaNn128 => "gemm_nn_bf16_wgmma_128x128",
            GemmKernel::TensorCoreNn128 => "gemm_nn_bf16_128x128",
            GemmKernel::TensorCoreNn64 => "gemm_nn_bf16_64x64",
            GemmKernel::Thin(tile) => tile.entry(),
            GemmKernel::SplitF32 => "split_f32_bf16",
            GemmKernel::Generic => "gemm_generic",
        }
    }
}

/// The launch of a GEMM kernel that gives each block one `tile_m x tile_n` tile of the
/// `[m, n]` output: grid (column tiles, row tiles), `threads` a block, `smem` bytes of dynamic
/// shared memory. `op` names the caller in the row-tile limit's message.
fn tile_grid(
    op: &str,
    (m, n): (usize, usize),
    (tile_m, tile_n, threads, smem): (usize, usize, u32, u32),
) -> LaunchConfig {
    assert!(
        m.div_ceil(tile_m) < 65536,
        "{op}: m = {m} needs more than 65535 row tiles"
    );
    LaunchConfig {
        grid_dim: (
            int(n.div_ceil(tile_n), "column tiles") as u32,
            m.div_ceil(tile_m) as u32,
            1,
        ),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem,
    }
}

impl CudaBackend {
    /// Handles a product with nothing to multiply: `m` or `n` zero (nothing to do) or `k` zero
    /// (out = 0, or unchanged when accumulating). True when it did, and the caller is done.
    fn empty_product(
        &self,
        out: &mut CudaBuf,
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
        op: &str,
    ) -> bool {
        if m == 0 || n == 0 {
            return true;
        }
        if k == 0 {
            if !accumulate {
                self.stream()
                    .memset_zeros(&mut *out.data)
                    .unwrap_or_else(|e| panic!("{op}: zeroing out: {e}"));
            }
            return true;
        }
        false
    }

    /// The kernel `gemm` uses for `op(a) [m, k] x op(b) [k, n]` with these operand dtypes.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_kernel(
        &self,
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        a: DType,
        b: DType,
    ) -> GemmKernel {
        let simt = || thin_tile(m, n, k).map_or(GemmKernel::Generic, GemmKernel::Thin);
        let nn_chunks = !trans_a && !trans_b && k.is_multiple_of(8) && n.is_multiple_of(8);
        let one_f32 = matches!(
            (a, b),
            (DType::F32, DType::BF16) | (DType::BF16, DType::F32)
        );
        if nn_chunks && one_f32 && m.min(n) > 64 && k >= 512 {
            // Two bf16 tensor-core GEMMs beat one in f32 SIMT by far at these sizes.
            GemmKernel::SplitF32
        } else if trans_a || a != DType::BF16 || b != DType::BF16 || !k.is_multiple_of(8) {
            simt()
        } else if trans_b {
            GemmKernel::Projection(self.matmul_kernel(m, n, k, a, b))
        } else if !n.is_multiple_of(8) {
            simt()
        } else if m.div_ceil(128) * n.div_ceil(256) >= self.sm_count()
            && self.has_kernel(GemmKernel::WgmmaTmaNn128x256.entry())
        {
            GemmKernel::WgmmaTmaNn128x256
        } else if m.div_ceil(128) * n.div_ceil(128) >= self.sm_count() {
            if self.has_kernel(GemmKernel::WgmmaNn128.entry()) {
                GemmKernel::WgmmaNn128
            } else {
                GemmKernel::TensorCoreNn128
            }
        } else {
            GemmKernel::TensorCoreNn64
        }
    }

    /// The kernel `matmul` uses for `[m, k] x [n, k]^T` with these operand dtypes: tensor cores
    /// need bf16 x and w and 16-byte k-chunks; on Hopper the TMA kernel's 128x256 tiles once
    /// they fill every SM; 128x128 tiles once those do (with wgmma where the Hopper kernel is
    /// loaded), else 64x64 for more blocks. Other operands (f32 LoRA factors) run SIMT: the
    /// generic GEMV at decode, else [`thin_tile`]'s kernel where it applies, else 64x64 tiles.
    pub fn matmul_kernel(&self, m: usize, n: usize, k: usize, x: DType, w: DType) -> MatmulKernel {
        if x != DType::BF16 || w != DType::BF16 || !k.is_multiple_of(8) {
            if m <= MATVEC_MAX_M {
                MatmulKernel::MatvecGeneric
            } else {
                thin_tile(m, n, k).map_or(MatmulKernel::Generic, MatmulKernel::Thin)
            }
        } else if m <= MATVEC_MAX_M {
            MatmulKernel::Matvec
        } else if m.div_ceil(128) * n.div_ceil(256) >= self.sm_count()
            && self.has_kernel(MatmulKernel::WgmmaTma128x256.entry())
        {
            MatmulKernel::WgmmaTma128x256
        } else if m.div_ceil(128) * n.div_ceil(128) >= self.sm_count() {
            if self.has_kernel(MatmulKernel::Wgmma128.entry()) {
                MatmulKernel::Wgmma128
            } else {
                MatmulKernel::TensorCore128
            }
        } else {
            MatmulKernel::TensorCore64
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn matmul_impl(
        &self,
        x: &CudaBuf,
        w: &CudaBuf,
        out: &mut CudaBuf,
        m: usize,
        n: usize,
        k: usize,
        scale: f32,
        accumulate: bool,
    ) {
        let kernel = self.matmul_kernel(m, n, k, x.dtype, w.dtype);
        self.matmul_using(kernel, x, w, out, m, n, k, scale, accumulate);
    }

    /// `matmul` through a chosen kernel (tests and benchmarks compare the paths), which must
    /// be able to take the shape: the tensor-core kernels need bf16 x and w and k % 8 == 0,
    /// the GEMVs m <= 8, the Hopper kernel a GPU that loaded it; the SIMT ones take anything.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_using(
        &self,
        kernel: MatmulKernel,
        x: &CudaBuf,
        w: &CudaBuf,
        out: &mut CudaBuf,
        m: usize,
        n: usize,
        k: usize,
        scale: f32,
        accumulate: bool,
    ) {
        assert_eq!(x.len, m * k, "matmul: x is not [m={m}, k={k}]");
        assert_eq!(w.len, n * k, "matmul: w is not [n={n}, k={k}]");
        assert_eq!(out.len, m * n, "matmul: out is not [m={m}, n={n}]");
        if self.empty_product(out, m, n, k, accumulate, "matmul") {
            return;
        }
        // The kernels that are not loaded on every GPU.
        assert!(
            !matches!(
                kernel,
                MatmulKernel::Wgmma128 | MatmulKernel::WgmmaTma128x256
            ) || self.has_kernel(kernel.entry()),
            "matmul: {} is not loaded on this GPU (compute capability 9.0 only)",
            kernel.entry()
        );
        let simt = matches!(
            kernel,
            MatmulKernel::Generic | MatmulKernel::MatvecGeneric | MatmulKernel::Thin(_)
        );
        if let MatmulKernel::Thin(tile) = kernel {
            // x w^T is gemm's (false, true).
            let gemm = GemmKernel::Thin(tile);
            return self.gemm_using(gemm, x, w, out, m, n, k, false, true, scale, accumulate);
        }
        if !simt {
            assert!(
                x.dtype == DType::BF16 && w.dtype == DType::BF16 && k.is_multiple_of(8),
                "matmul: {} needs bf16 x and w and k % 8 == 0 (k = {k})",
                kernel.entry()
            );
        }
        assert!(
            !matches!(kernel, MatmulKernel::Matvec | MatmulKernel::MatvecGeneric)
                || m <= MATVEC_MAX_M,
            "matmul: the GEMVs take m <= {MATVEC_MAX_M}, not {m}"
        );
        if !simt {
            // 16-byte cp.async / vector loads: whole-allocation buffers are 256-byte aligned,
            // and k % 8 == 0 keeps every row on a 16-byte boundary.
            assert!(
                self.addr(x).is_multiple_of(16) && self.addr(w).is_multiple_of(16),
                "matmul: x and w must be 16-byte aligned"
            );
        }
        let (m_i, n_i, k_i) = (int(m, "matmul m"), int(n, "matmul n"), int(k, "matmul k"));
        let (out_f32, acc_i) = (out.dtype.flag(), accumulate as i32);
        let name = kernel.entry();
        // matvec_generic's threads per output feature: a block each while there are fewer
        // features than SMs (a LoRA rank), else a warp each.
        let matvec_tpf = if n < self.sm_count() { 256 } else { 32 };
        // (rows, columns) of the output tile, threads, dynamic shared memory.
        let tiles = |tile| tile_grid("matmul", (m, n), tile);
        let cfg = match kernel {
            MatmulKernel::WgmmaTma128x256 => tiles((128, 256, 384, GEMM_TMA_SMEM)),
            MatmulKernel::Wgmma128 => tiles((128, 128, 256, GEMM_WGMMA_SMEM)),
            MatmulKernel::TensorCore128 => tiles((128, 128, 256, GEMM_128_SMEM)),
            MatmulKernel::TensorCore64 => tiles((64, 64, 128, 4 * (64 + 64) * 40 * 2)),
            MatmulKernel::Matvec => LaunchConfig {
                grid_dim: (n.div_ceil(8) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            MatmulKernel::MatvecGeneric => LaunchConfig {
                grid_dim: (n.div_ceil(256 / matvec_tpf) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            MatmulKernel::Generic => tiles((64, 64, 256, 0)),
            MatmulKernel::Thin(_) => unreachable!("ran as gemm above"),
        };
        let shape = [
            Arg::I32(m_i),
            Arg::I32(n_i),
            Arg::I32(k_i),
            Arg::F32(scale),
            Arg::I32(acc_i),
        ];
        // x and w as each kernel takes them: with their dtype flags (SIMT), as TMA tensor maps
        // (the Hopper TMA kernel), or as bf16 pointers.
        let operands = match kernel {
            MatmulKernel::Generic | MatmulKernel::MatvecGeneric => vec![
                Arg::In(x),
                Arg::I32(x.dtype.flag()),
                Arg::In(w),
                Arg::I32(w.dtype.flag()),
            ],
            MatmulKernel::WgmmaTma128x256 => vec![
                Arg::TensorMap(self.tensor_map_bf16(x, m, k, 128)),
                Arg::TensorMap(self.tensor_map_bf16(w, n, k, 256)),
            ],
            _ => vec![Arg::In(x), Arg::In(w)],
        };
        let mut args = operands
            .into_iter()
            .chain([Arg::Out(out), Arg::I32(out_f32)])
            .chain(shape)
            .collect::<Vec<_>>();
        if kernel == MatmulKernel::MatvecGeneric {
            args.push(Arg::I32(matvec_tpf as i32));
        }
        // SAFETY: every entry takes (x and w as above, void* out, int out_f32, int M, int N,
        // int K, float scale, int accumulate): matmul_generic and matvec_generic(const void* x,
        // int, const void* w, int, ..., then int tpf), matmul_bf16_wgmma_tma_128x256(TensorMap
        // x, TensorMap w, ...) with maps of exactly x [m, k] and w [n, k], the others
        // (const bf16* x, const bf16* w, ...). Sizes,
        // and for the bf16 kernels dtypes, k % 8 == 0 and 16-byte alignment, checked above.
        unsafe { self.launch(name, cfg, &mut args) };
    }

    /// The TMA tensor map of a row-major bf16 matrix `[rows, cols]` read in boxes of
    /// `box_rows` rows x 64 columns, stored in the 128-byte swizzle, with zeros for elements
    /// past its edges (kernels/matmul_tma_sm90.cu). Needs cols % 8 == 0 and a 16-byte-aligned
    /// buffer (the row stride and the address are multiples of 16 bytes), as the caller checked.
    fn tensor_map_bf16(&self, buf: &CudaBuf, rows: usize, cols: usize, box_rows: u32) -> TensorMap {
        let dims = [cols as u64, rows as u64];
        let strides = [2 * cols as u64];
        let boxes = [64u32, box_rows];
        let steps = [1u32, 1];
        // SAFETY: a zeroed CUtensorMap is plain bytes the call overwrites.
        let mut map: sys::CUtensorMap = unsafe { std::mem::zeroed() };
        // SAFETY: every array has the rank's length (strides one less); the address is the
        // buffer's, which outlives the launch that reads through the map.
        let r = unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut map,
                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                2,
                self.addr(buf) as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                steps.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        assert_eq!(
            r,
            sys::CUresult::CUDA_SUCCESS,
            "cuTensorMapEncodeTiled for a bf16 [{rows}, {cols}] operand (box {box_rows} x 64) failed"
        );
        TensorMap(map)
    }

    /// `Backend::matmul_lora`: on the decode GEMV path the LoRA up projection runs in the
    /// GEMV's epilogue (`matvec_lora_bf16`); every other shape runs the two matmuls.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn matmul_lora_impl(
        &self,
        x: &CudaBuf,
        w: &CudaBuf,
        xa: &CudaBuf,
        b: &CudaBuf,
        out: &mut CudaBuf,
        m: usize,
        n: usize,
        k: usize,
        rank: usize,
        lora_scale: f32,
    ) {
        if m == 0
            || n == 0
            || k == 0
            || self.matmul_kernel(m, n, k, x.dtype, w.dtype) != MatmulKernel::Matvec
        {
            self.matmul_impl(x, w, out, m, n, k, 1.0, false);
            self.matmul_impl(xa, b, out, m, n, rank, lora_scale, true);
            return;
        }
        assert_eq!(x.len, m * k, "matmul_lora: x is not [m={m}, k={k}]");
        assert_eq!(w.len, n * k, "matmul_lora: w is not [n={n}, k={k}]");
        assert_eq!(out.len, m * n, "matmul_lora: out is not [m={m}, n={n}]");
        assert!(
            self.addr(x).is_multiple_of(16) && self.addr(w).is_multiple_of(16),
            "matmul_lora: x and w must be 16-byte aligned"
        );
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let out_f32 = out.dtype.flag();
        let mut args = vec![
            Arg::In(x),
            Arg::In(w),
            Arg::Out(out),
            Arg::I32(out_f32),
            Arg::I32(int(m, "matmul m")),
            Arg::I32(int(n, "matmul n")),
            Arg::I32(int(k, "matmul k")),
            Arg::F32(1.0),
            Arg::I32(0),
        ];
        args.extend(self.lora_args("matmul_lora", Some((xa, b, rank, lora_scale)), m, n));
        // SAFETY: matvec_lora_bf16(const bf16* x, const bf16* w, void* out, int, int M, int N,
        // int K, float scale, int accumulate, const void* xa, int, const void* lb, int, int rank,
        // float lora_scale); shapes, dtypes (matvec plan) and alignment checked above.
        unsafe { self.launch("matvec_lora_bf16", cfg, &mut args) };
    }

    /// A LoRA term as the fused GEMVs' kernel arguments `(xa, xa_f32, b, b_f32, rank, scale)`
    /// (null pointers when absent), its shapes checked against `m` rows and `n` features.
    fn lora_args(
        &self,
        op: &str,
        lora: crate::backend::LoraTerm<CudaBuf>,
        m: usize,
        n: usize,
    ) -> [Arg<'static>; 6] {
        let Some((xa, b, rank, scale)) = lora else {
            return [
                Arg::Ptr(0),
                Arg::I32(0),
                Arg::Ptr(0),
                Arg::I32(0),
                Arg::I32(0),
                Arg::F32(0.0),
            ];
        };
        assert_eq!(xa.len, m * rank, "{op}: xa is not [m={m}, rank={rank}]");
        assert_eq!(b.len, n * rank, "{op}: b is not [n={n}, rank={rank}]");
        [
            Arg::Ptr(self.addr(xa)),
            Arg::I32(xa.dtype.flag()),
            Arg::Ptr(self.addr(b)),
            Arg::I32(b.dtype.flag()),
            Arg::I32(int(rank, "lora rank")),
            Arg::F32(scale),
        ]
    }

    /// `Backend::qkv_proj`: on the decode GEMV path one launch of `matvec_qkv_bf16` for all
    /// three projections (each with its LoRA term in the epilogue, as `matvec_lora_bf16`);
    /// every other shape runs the trait's default steps.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn qkv_proj_impl(
        &self,
        x: &CudaBuf,
        w: [&CudaBuf; 3],
        lora: [crate::backend::LoraTerm<CudaBuf>; 3],
        out: [&mut CudaBuf; 3],
        m: usize,
        n: [usize; 3],
        k: usize,
    ) {
        let fused = m > 0
            && k > 0
            && n.iter().all(|&n| n > 0)
            && w.iter().all(|wj| wj.dtype == w[0].dtype)
            && out.iter().all(|o| o.dtype == out[0].dtype)
            && self.matmul_kernel(m, n[0], k, x.dtype, w[0].dtype) == MatmulKernel::Matvec;
        if !fused {
            crate::backend::qkv_proj_steps(self, x, w, lora, out, m, n, k);
            return;
        }
        assert_eq!(x.len, m * k, "qkv_proj: x is not [m={m}, k={k}]");
        for j in 0..3 {
            let what = ["q", "k", "v"][j];
            assert_eq!(
                w[j].len,
                n[j] * k,
                "qkv_proj: w{what} is not [{}, {k}]",
                n[j]
            );
            assert_eq!(
                out[j].len,
                m * n[j],
                "qkv_proj: {what} is not [{m}, {}]",
                n[j]
            );
            assert!(
                self.addr(w[j]).is_multiple_of(16),
                "qkv_proj: w{what} must be 16-byte aligned"
            );
        }
        assert!(
            self.addr(x).is_multiple_of(16),
            "qkv_proj: x must be 16-byte aligned"
        );
        let total = n[0] + n[1] + n[2];
        let cfg = LaunchConfig {
            grid_dim: (int(total.div_ceil(8), "qkv_proj features") as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let out_f32 = out[0].dtype.flag();
        let [oq, ok, ov] = out;
        let mut args = vec![
            Arg::In(x),
            Arg::I32(out_f32),
            Arg::I32(int(m, "matmul m")),
            Arg::I32(int(k, "matmul k")),
        ];
        for (j, o) in [oq, ok, ov].into_iter().enumerate() {
            args.push(Arg::In(w[j]));
            args.push(Arg::Out(o));
            args.push(Arg::I32(int(n[j], "matmul n")));
            args.extend(self.lora_args("qkv_proj", lora[j], m, n[j]));
        }
        // SAFETY: matvec_qkv_bf16(const bf16* x, int out_f32, int M, int K, then per projection
        // (const bf16* w, void* out, int N, const void* xa, int, const void* lb, int, int rank,
        // float scale)); shapes, dtypes (matvec plan) and alignment checked above.
        unsafe { self.launch("matvec_qkv_bf16", cfg, &mut args) };
    }

    /// `Backend::gate_up_swiglu`: on the decode GEMV path one launch of `matvec_swiglu_bf16`
    /// (gate and up are not written); every other shape runs the trait's default steps.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gate_up_swiglu_impl(
        &self,
        x: &CudaBuf,
        wg: &CudaBuf,
        wu: &CudaBuf,
        lora_g: crate::backend::LoraTerm<CudaBuf>,
        lora_u: crate::backend::LoraTerm<CudaBuf>,
        gate: &mut CudaBuf,
        up: &mut CudaBuf,
        act: &mut CudaBuf,
        m: usize,
        n: usize,
        k: usize,
    ) {
        let fused = m > 0
            && n > 0
            && k > 0
            && wg.dtype == wu.dtype
            && self.matmul_kernel(m, n, k, x.dtype, wg.dtype) == MatmulKernel::Matvec;
        if !fused {
            crate::backend::gate_up_swiglu_steps(
                self, x, wg, wu, lora_g, lora_u, gate, up, act, m, n, k,
            );
            return;
        }
        assert_eq!(x.len, m * k, "gate_up_swiglu: x is not [m={m}, k={k}]");
        assert_eq!(wg.len, n * k, "gate_up_swiglu: wg is not [n={n}, k={k}]");
        assert_eq!(wu.len, n * k, "gate_up_swiglu: wu is not [n={n}, k={k}]");
        assert_eq!(act.len, m * n, "gate_up_swiglu: act is not [m={m}, n={n}]");
        assert!(
            [x, wg, wu].iter().all(|b| self.addr(b).is_multiple_of(16)),
            "gate_up_swiglu: x, wg and wu must be 16-byte aligned"
        );
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let act_f32 = act.dtype.flag();
        let mut args: Vec<Arg<'_>> = vec![
            Arg::In(x),
            Arg::In(wg),
            Arg::In(wu),
            Arg::Out(act),
            Arg::I32(act_f32),
            Arg::I32(int(m, "matmul m")),
            Arg::I32(int(n, "matmul n")),
            Arg::I32(int(k, "matmul k")),
        ];
        args.extend(self.lora_args("gate_up_swiglu", lora_g, m, n));
        args.extend(self.lora_args("gate_up_swiglu", lora_u, m, n));
        // SAFETY: matvec_swiglu_bf16(const bf16* x, const bf16* wg, const bf16* wu, void* act,
        // int, int M, int N, int K, then (const void* xa, int, const void* b, int, int rank,
        // float scale) for gate and for up); shapes, the matvec plan (bf16, k % 8 == 0, m <= 8)
        // and alignment checked above; the LoRA buffers outlive the launch (borrowed).
        unsafe { self.launch("matvec_swiglu_bf16", cfg, &mut args) };
    }

    pub(super) fn add_bias_impl(&self, x: &mut CudaBuf, bias: &CudaBuf) {
        assert!(bias.len > 0, "add_bias: empty bias");
        assert_eq!(
            x.len % bias.len,
            0,
            "add_bias: rows are not a multiple of the bias"
        );
        if x.len == 0 {
            return;
        }
        let name = format!("add_bias_{}", x.dtype.suffix());
        let (bias_f32, n, width) = (bias.dtype.flag(), x.len as i64, int(bias.len, "bias width"));
        let blocks = x.len.div_ceil(256).min(self.sm_count() * 16);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = [
            Arg::Out(x),
            Arg::In(bias),
            Arg::I32(bias_f32),
            Arg::I64(n),
            Arg::I32(width),
        ];
        // SAFETY: add_bias_T(T* x, const void* bias, int, long long n, int width); sizes checked.
        unsafe { self.launch(&name, cfg, &mut args) };
    }

    /// `out[m,n] = (accumulate ? out : 0) + scale * op(a) op(b)` (the backward's GEMM; see
    /// `BackwardOps::gemm` for the layouts). bf16 `a b^T` is the projection GEMM; bf16 `a b`
    /// with 16-byte rows (dX = dY W) runs on tensor cores (wgmma on Hopper); everything else
    /// (transposed a, f32 operands: the LoRA factors' gradients) runs `gemm_generic` (SIMT).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_impl(
        &self,
        a: &CudaBuf,
        b: &CudaBuf,
        out: &mut CudaBuf,
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        scale: f32,
        accumulate: bool,
    ) {
        let kernel = self.gemm_kernel(m, n, k, trans_a, trans_b, a.dtype, b.dtype);
        self.gemm_using(
            kernel, a, b, out, m, n, k, trans_a, trans_b, scale, accumulate,
        );
    }

    /// `gemm` through a given kernel (tests and benchmarks compare them on the same shapes);
    /// panics when the kernel cannot take the operands.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_using(
        &self,
        kernel: GemmKernel,
        a: &CudaBuf,
        b: &CudaBuf,
        out: &mut CudaBuf,
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        scale: f32,
        accumulate: bool,
    ) {
        assert_eq!(a.len, m * k, "gemm: a has {} values, not {m}x{k}", a.len);
        assert_eq!(b.len, k * n, "gemm: b has {} values, not {k}x{n}", b.len);
        assert_eq!(
            out.len,
            m * n,
            "gemm: out has {} values, not {m}x{n}",
            out.len
        );
        if self.empty_product(out, m, n, k, accumulate, "gemm") {
            return;
        }
        if let GemmKernel::Projection(kn) = kernel {
            assert!(!trans_a && trans_b, "gemm: the projection GEMM takes a b^T");
            return self.matmul_using(kn, a, b, out, m, n, k, scale, accumulate);
        }
        // The tensor-core `a b` kernels (the split one runs through them) read a's and b's rows
        // in 16-byte chunks.
        let nn_chunks = !trans_a && !trans_b && k.is_multiple_of(8) && n.is_multiple_of(8);
        if kernel == GemmKernel::SplitF32 {
            assert!(
                nn_chunks && (a.dtype == DType::F32) != (b.dtype == DType::F32),
                "gemm: the split GEMM takes a b with one operand f32 and the other bf16, k % 8 == 0 and n % 8 == 0 (k = {k}, n = {n})"
            );
            return self.gemm_split_f32(a, b, out, m, n, k, scale, accumulate);
        }
        if !matches!(kernel, GemmKernel::Generic | GemmKernel::Thin(_)) {
            let name = kernel.entry();
            assert!(
                nn_chunks && a.dtype == DType::BF16 && b.dtype == DType::BF16,
                "gemm: {name} takes bf16 a b with k % 8 == 0 and n % 8 == 0 (k = {k}, n = {n})"
            );
            // The kernels that are not loaded on every GPU.
            assert!(
                !matches!(
                    kernel,
                    GemmKernel::WgmmaNn128 | GemmKernel::WgmmaTmaNn128x256
                ) || self.has_kernel(name),
                "gemm: {name} is not loaded on this GPU (compute capability 9.0 only)"
            );
            assert!(
                self.addr(a).is_multiple_of(16) && self.addr(b).is_multiple_of(16),
                "gemm: a and b must be 16-byte aligned"
            );
            // (rows, columns) of the output tile, threads, dynamic shared memory.
            let tile = match kernel {
                GemmKernel::WgmmaTmaNn128x256 => (128, 256, 384, GEMM_TMA_SMEM),
                GemmKernel::WgmmaNn128 => (128, 128, 256, GEMM_WGMMA_SMEM),
                GemmKernel::TensorCoreNn128 => (128, 128, 256, GEMM_NN_128_SMEM),
                _ => (64, 64, 128, 4 * (64 * 40 + 32 * (64 + 8)) * 2),
            };
            let cfg = tile_grid("gemm", (m, n), tile);
            let out_f32 = out.dtype.flag();
            // a and b as pointers, or as TMA tensor maps (a [m, k], b [k, n]) for the TMA kernel.
            let operands = if kernel == GemmKernel::WgmmaTmaNn128x256 {
                [
                    Arg::TensorMap(self.tensor_map_bf16(a, m, k, 128)),
                    Arg::TensorMap(self.tensor_map_bf16(b, k, n, 64)),
                ]
            } else {
                [Arg::In(a), Arg::In(b)]
            };
            let mut args = operands
                .into_iter()
                .chain([
                    Arg::Out(out),
                    Arg::I32(out_f32),
                    Arg::I32(int(m, "gemm m")),
                    Arg::I32(int(n, "gemm n")),
                    Arg::I32(int(k, "gemm k")),
                    Arg::F32(scale),
                    Arg::I32(accumulate as i32),
                ])
                .collect::<Vec<_>>();
            // SAFETY: gemm_nn_bf16_*(const bf16* a, const bf16* b, void* out, int, int M,
            // int N, int K, float scale, int accumulate), the TMA kernel with maps of exactly
            // a [m, k] and b [k, n] in place of the pointers; bf16 operands, k % 8 == 0,
            // n % 8 == 0 and 16-byte alignment checked above.
            unsafe { self.launch(name, cfg, &mut args) };
            return;
        }
        let (tile_m, tile_n) = match kernel {
            GemmKernel::Thin(tile) => tile.dims(),
            _ => (64, 64),
        };
        let cfg = tile_grid("gemm", (m, n), (tile_m, tile_n, 256, 0));
        let (a_f32, b_f32, out_f32) = (a.dtype.flag(), b.dtype.flag(), out.dtype.flag());
        let mut args = [
            Arg::In(a),
            Arg::I32(a_f32),
            Arg::In(b),
            Arg::I32(b_f32),
            Arg::Out(out),
            Arg::I32(out_f32),
            Arg::I32(int(m, "gemm m")),
            Arg::I32(int(n, "gemm n")),
            Arg::I32(int(k, "gemm k")),
            Arg::I32(trans_a as i32),
            Arg::I32(trans_b as i32),
            Arg::F32(scale),
            Arg::I32(accumulate as i32),
        ];
        // SAFETY: gemm_generic and gemm_thin_*(const void* a, int, const void* b, int,
        // void* out, int, int M, int N, int K, int trans_a, int trans_b, float scale,
        // int accumulate); sizes checked above (a and b hold m*k and k*n values whichever way
        // they are transposed).
        unsafe { self.launch(kernel.entry(), cfg, &mut args) };
    }

    /// [`GemmKernel::SplitF32`]: the f32 operand as `hi + lo` in bf16, then `hi b + lo b` (or
    /// `a hi + a lo`) on the tensor-core kernel bf16 operands of this shape get, accumulated
    /// in f32 (in out, or in an f32 temporary added to a bf16 out once, so out is rounded once).
    #[allow(clippy::too_many_arguments)]
    fn gemm_split_f32(
        &self,
        a: &CudaBuf,
        b: &CudaBuf,
        out: &mut CudaBuf,
        m: usize,
        n: usize,
        k: usize,
        scale: f32,
        accumulate: bool,
    ) {
        let bf16 = DType::BF16;
        let inner = self.gemm_kernel(m, n, k, false, false, bf16, bf16);
        let alloc = |len: usize, dtype: DType| {
            self.alloc_dtype(len, dtype)
                .unwrap_or_else(|e| panic!("gemm: the f32 operand's bf16 halves and sum: {e:#}"))
        };
        let split_a = a.dtype == DType::F32;
        let f32_side = if split_a { a } else { b };
        let (mut hi, mut lo) = (alloc(f32_side.len, bf16), alloc(f32_side.len, bf16));
        // A thread takes 4 f32 values per wave (elementwise_config), grid-striding past that.
        let cfg = elementwise_config(self, f32_side.len, 4);
        let len = f32_side.len as i64;
        let mut args = [
            Arg::In(f32_side),
            Arg::Out(&mut hi),
            Arg::Out(&mut lo),
            Arg::I64(len),
        ];
        // SAFETY: split_f32_bf16(const float* a, bf16* hi, bf16* lo, long long n); the split
        // operand is f32 (the caller checked), hi and lo bf16 of its length.
        unsafe { self.launch("split_f32_bf16", cfg, &mut args) };
        // The two halves' products, the second accumulating onto the first.
        let halves = |sum: &mut CudaBuf, first_accumulates: bool| {
            for (half, acc) in [(&hi, first_accumulates), (&lo, true)] {
                let (x, y) = if split_a { (half, b) } else { (a, half) };
                self.gemm_using(inner, x, y, sum, m, n, k, false, false, scale, acc);
            }
        };
        if out.dtype == DType::F32 {
            halves(out, accumulate);
        } else {
            let mut sum = alloc(m * n, DType::F32);
            halves(&mut sum, false);
            if !accumulate {
                self.stream()
                    .memset_zeros(&mut *out.data)
                    .unwrap_or_else(|e| panic!("gemm: zeroing out: {e}"));
            }
            self.axpy_impl(1.0, &sum, out);
        }
    }

    /// `y += alpha * x`; x and y may differ in dtype (a bf16 gradient into an f32 sum).
    pub(super) fn axpy_impl(&self, alpha: f32, x: &CudaBuf, y: &mut CudaBuf) {
        assert_eq!(x.len, y.len, "axpy: sizes differ");
        if x.len == 0 {
            return;
        }
        let name = match (x.dtype.suffix(), y.dtype.suffix()) {
            (a, b) if a == b => format!("axpy_{a}"),
            (a, b) => format!("axpy_{a}_{b}"),
        };
        let blocks = x.len.div_ceil(256 * 4).clamp(1, self.sm_count() * 8);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = [
            Arg::F32(alpha),
            Arg::In(x),
            Arg::Out(y),
            Arg::I64(x.len as i64),
        ];
        // SAFETY: axpy_*(float alpha, const TX* x, TY* y, long long n); sizes checked above.
        unsafe { self.launch(&name, cfg, &mut args) };
    }
}
