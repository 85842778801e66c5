//! cuBLASLt's bf16 GEMM on the backend's buffers (feature `cublaslt`), for comparison only:
//! `bench kernels` times it next to the hand-written projection GEMM and a parity test checks
//! one against the other. The model never calls it.
//!
//! libcublasLt is opened at run time (cudarc's dynamic loading, like the driver): cudarc panics
//! on first use when the library is missing, so every entry here checks
//! `cublaslt::sys::is_culib_present()` first and answers an error naming the library instead.
//! The bindings are CUDA 13.0's (`cuda-13000`), so libcublasLt.so.13 is the library they are
//! meant for; cudarc's loader also accepts `libcublasLt.so` and older sonames (`.so.12`, ...).

use super::device::{CudaBackend, CudaBuf, DType};
use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::cublaslt::result::{self as lt, CublasError};
use cudarc::cublaslt::sys;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use std::collections::HashMap;
use std::ffi::c_void;

/// The cuBLASLt state of one device: the handle, its workspace, and one plan per GEMM shape
/// (descriptors and the heuristic's algorithm), so a timed call is the `cublasLtMatmul` launch
/// alone, with no host-side algorithm search between the timing events.
pub(super) struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    version: usize,
    plans: HashMap<(usize, usize, usize, DType), Plan>,
}

// SAFETY: the handle is only used under the device's `Mutex<Option<Lt>>`, one call at a time.
unsafe impl Send for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: created by `cublasLtCreate` in `Lt::new`, destroyed once, after its plans.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// Descriptors of `out = x w^T` at one shape, and the algorithm cuBLASLt chose for it.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each was created once in `Plan::new` and is destroyed once here. A null
        // layout (a plan whose creation failed halfway) is skipped.
        unsafe {
            for l in [self.a, self.b, self.c] {
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

fn lt_err(what: &str) -> impl FnOnce(CublasError) -> anyhow::Error + '_ {
    move |e| anyhow!("cuBLASLt: {what}: {e}")
}

impl Plan {
    /// cuBLAS is column-major. The row-major `out[m, n]` is, read column-major, `out^T` of
    /// shape `[n, m]` with leading dimension n, and `out^T = (x w^T)^T = w x^T`. The row-major
    /// `w[n, k]` read column-major is `w^T` (`[k, n]`, ld k), so op(A) = T gives `w`; the
    /// row-major `x[m, k]` read column-major is `x^T` (`[k, m]`, ld k), taken as is (op(B) =
    /// N). So the call is the "TN" GEMM `C[n, m] = A^T B` with A = w, B = x, C = out:
    /// cuBLAS's m, n, k are our n, m, k. Inputs bf16, compute and scale f32, C bf16 or f32.
    fn new(
        handle: sys::cublasLtHandle_t,
        workspace: usize,
        (m, n, k): (usize, usize, usize),
        out: DType,
    ) -> Result<Self> {
        let c_type = match out {
            DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
            DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        };
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(lt_err("creating the matmul descriptor"))?;
        let mut plan = Plan {
            desc,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        // cublasOperation_t: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 (a 32-bit enum).
        for (attr, op) in [
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                1i32,
            ),
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                0i32,
            ),
        ] {
            // SAFETY: a live descriptor and a 4-byte value of the attribute's type.
            unsafe {
                lt::set_matmul_desc_attribute(
                    desc,
                    attr,
                    (&op as *const i32).cast(),
                    std::mem::size_of::<i32>(),
                )
            }
            .map_err(lt_err("setting the transposes"))?;
        }
        let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
        plan.a = lt::create_matrix_layout(bf16, k as u64, n as u64, k as i64)
            .map_err(lt_err("creating w's layout"))?;
        plan.b = lt::create_matrix_layout(bf16, k as u64, m as u64, k as i64)
            .map_err(lt_err("creating x's layout"))?;
        plan.c = lt::create_matrix_layout(c_type, n as u64, m as u64, n as i64)
            .map_err(lt_err("creating out's layout"))?;
        let pref = lt::create_matmul_pref().map_err(lt_err("creating the preference"))?;
        // SAFETY: every descriptor is live; the preference is destroyed right after the query.
        let found = unsafe {
            let found = lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&workspace as *const usize).cast(),
                std::mem::size_of::<usize>(),
            )
            .and_then(|()| {
                lt::get_matmul_algo_heuristic(handle, desc, plan.a, plan.b, plan.c, plan.c, pref)
            });
            let _ = lt::destroy_matmul_pref(pref);
            found
        };
        let found = found.map_err(|e| {
            anyhow!("cuBLASLt found no algorithm for the bf16 GEMM [{m}, {k}] x [{n}, {k}]^T -> {out:?}: {e}")
        })?;
        plan.algo = found.algo;
        Ok(plan)
    }
}

impl Lt {
    fn new(be: &CudaBackend) -> Result<Self> {
        // SAFETY: only tries to dlopen libcublasLt under the names cudarc would use.
        if !unsafe { sys::is_culib_present() } {
            let mut tried = cudarc::get_lib_name_candidates("cublasLt");
            let mut seen = std::collections::HashSet::new();
            tried.retain(|name| seen.insert(name.clone()));
            bail!(
                "cuBLASLt unavailable: libcublasLt could not be loaded (tried {}); the `cublaslt` \
                 feature needs CUDA 13's libcublasLt.so.13 on the loader path (LD_LIBRARY_PATH), \
                 e.g. the nvidia-cublas wheel's nvidia/cu13/lib",
                tried.join(", ")
            );
        }
        be.dev.ctx.bind_to_thread()?;
        // SAFETY: the library is loaded (checked above).
        let version = unsafe { sys::cublasLtGetVersion() };
        let handle = lt::create_handle().map_err(lt_err("creating the handle"))?;
        // NVIDIA's recommended workspace: 32 MiB on Hopper, 4 MiB before.
        let major = be
            .dev
            .ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let bytes: usize = if major >= 9 { 32 << 20 } else { 4 << 20 };
        let workspace = match be.stream().alloc_zeros::<u8>(bytes) {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: created just above and not used since.
                let _ = unsafe { lt::destroy_handle(handle) };
                return Err(e).context("allocating cuBLASLt's workspace");
            }
        };
        Ok(Self {
            handle,
            workspace,
            version,
            plans: HashMap::new(),
        })
    }
}

/// `major.minor.patch` of a `cublasLtGetVersion()` value (major * 10000 + minor * 100 + patch).
fn version_string(v: usize) -> String {
    format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100)
}

impl CudaBackend {
    /// Runs `f` on this device's cuBLASLt state, creating it on first use. Errors (never
    /// panics) when libcublasLt cannot be loaded or the handle cannot be created; a failure is
    /// not cached, so the next call tries again.
    fn with_cublaslt<T>(&self, f: impl FnOnce(&mut Lt) -> Result<T>) -> Result<T> {
        let mut slot = self.cublaslt.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(Lt::new(self)?);
        }
        f(slot.as_mut().expect("created above"))
    }

    /// The cuBLASLt library's version (`13.0.2`), loading it and creating the device's handle
    /// if that has not happened yet: the check that the comparison can run here.
    pub fn cublaslt_version(&self) -> Result<String> {
        self.with_cublaslt(|lt| Ok(version_string(lt.version)))
    }

    /// `out[m, n] = x[m, k] w[n, k]^T` through cuBLASLt: the contract of the hand-written
    /// `matmul` with scale 1 and no accumulation (x and w bf16, f32 accumulation, out bf16 or
    /// f32), for benchmarks and parity checks only. Shapes and dtypes are checked first and
    /// answered as errors.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_cublaslt(
        &self,
        x: &CudaBuf,
        w: &CudaBuf,
        out: &mut CudaBuf,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        ensure!(
            x.dtype == DType::BF16 && w.dtype == DType::BF16,
            "matmul_cublaslt: x and w must be bf16 (got {:?} and {:?})",
            x.dtype,
            w.dtype
        );
        ensure!(
            x.len == m * k,
            "matmul_cublaslt: x has {} values, not [m={m}, k={k}]",
            x.len
        );
        ensure!(
            w.len == n * k,
            "matmul_cublaslt: w has {} values, not [n={n}, k={k}]",
            w.len
        );
        ensure!(
            out.len == m * n,
            "matmul_cublaslt: out has {} values, not [m={m}, n={n}]",
            out.len
        );
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            self.stream().memset_zeros(&mut *out.data)?;
            return Ok(());
        }
        let stream = self.stream().clone();
        self.with_cublaslt(|lt| {
            self.dev.ctx.bind_to_thread()?;
            let key = (m, n, k, out.dtype);
            if !lt.plans.contains_key(&key) {
                let plan = Plan::new(lt.handle, lt.workspace.len(), (m, n, k), out.dtype)?;
                lt.plans.insert(key, plan);
            }
            let plan = &lt.plans[&key];
            let (alpha, beta) = (1.0f32, 0.0f32);
            let (x_ptr, _x) = x.data.device_ptr(&stream);
            let (w_ptr, _w) = w.data.device_ptr(&stream);
            let (ws_ptr, _ws) = lt.workspace.device_ptr(&stream);
            let ws_len = lt.workspace.len();
            let (out_ptr, _out) = out.data.device_ptr_mut(&stream);
            // SAFETY: the layouts describe w [n, k], x [m, k] and out [m, n] (row-major, checked
            // above against the buffers' lengths); beta is 0, so C (= D, same layout) is only
            // written; the workspace is the size the plan was chosen for; everything is queued
            // on the backend's stream, after and before its other work.
            unsafe {
                lt::matmul(
                    lt.handle,
                    plan.desc,
                    (&alpha as *const f32).cast(),
                    (&beta as *const f32).cast(),
                    w_ptr as *const c_void,
                    plan.a,
                    x_ptr as *const c_void,
                    plan.b,
                    out_ptr as *const c_void,
                    plan.c,
                    out_ptr as *mut c_void,
                    plan.c,
                    &plan.algo,
                    ws_ptr as *mut c_void,
                    ws_len,
                    stream.cu_stream() as sys::cudaStream_t,
                )
            }
            .map_err(|e| anyhow!("cuBLASLt matmul [{m}, {k}] x [{n}, {k}]^T: {e}"))
        })
    }
}
