//! Context, stream, module cache and buffers of the CUDA backend, and its `Backend` impl (each
//! op forwards to the launcher in the file named after its kernel file).

use super::ptx::{KERNELS_COMPILED, NOT_COMPILED_REASON, NVCC_VERSION, PTX_ARCH, PTX_MODULES};
use crate::attack::pgd::{Ball, DeviceAdam, Update};
use crate::backend::{AttnShape, Backend, BackwardOps};
use crate::model::ModelConfig;
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// Storage type of a device buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    BF16,
    F32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::BF16 => 2,
            DType::F32 => 4,
        }
    }
    /// The suffix of kernel entry points for this dtype (`rmsnorm_bf16`).
    pub fn suffix(self) -> &'static str {
        match self {
            DType::BF16 => "bf16",
            DType::F32 => "f32",
        }
    }
    /// The `is_f32` flag that kernels take for side tensors.
    pub(super) fn flag(self) -> i32 {
        (self == DType::F32) as i32
    }
}

/// A flat device buffer: `len` elements of `dtype`, either an allocation of its own or a piece
/// carved from a group allocation (`CudaBackend::alloc_group`); always 256-byte aligned, which
/// the 16-byte vector paths rely on.
pub struct CudaBuf {
    /// For a carved piece, a view that must never be freed itself (it is leaked on drop).
    pub(super) data: ManuallyDrop<CudaSlice<u8>>,
    pub(super) dtype: DType,
    pub(super) len: usize,
    /// The group allocation this piece was carved from; it is freed with its last piece.
    arena: Option<Arc<Arena>>,
}

impl CudaBuf {
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }
    /// The category of the group allocation this buffer was carved from, if any.
    pub fn category(&self) -> Option<&'static str> {
        self.arena.as_ref().map(|a| a.category)
    }
}

/// Bytes held by live `CudaBuf`s in this process, and the most ever held at once (since the
/// last `CudaBackend::reset_peak_bytes`): the benchmarks' peak memory.
static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static PEAK_BYTES: AtomicUsize = AtomicUsize::new(0);

fn count_alloc(bytes: usize) {
    let live = LIVE_BYTES.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK_BYTES.fetch_max(live, Ordering::Relaxed);
}

/// One allocation that a group of buffers was carved from (weights of a model, a KV cache,
/// a layer's activations).
struct Arena {
    slice: CudaSlice<u8>,
    category: &'static str,
    pieces: usize,
}

/// Live group allocations, for `CudaBackend::arenas`.
fn arenas() -> &'static Mutex<Vec<Weak<Arena>>> {
    static ARENAS: OnceLock<Mutex<Vec<Weak<Arena>>>> = OnceLock::new();
    ARENAS.get_or_init(Default::default)
}

impl Drop for Arena {
    fn drop(&mut self) {
        LIVE_BYTES.fetch_sub(self.slice.len(), Ordering::Relaxed);
    }
}

impl Drop for CudaBuf {
    fn drop(&mut self) {
        // SAFETY: `data` is not touched again; the field is never dropped otherwise.
        let data = unsafe { ManuallyDrop::take(&mut self.data) };
        if self.arena.is_some() {
            // A view into the arena: freeing it would free the arena's base pointer (or an
            // interior one). The arena frees the whole block when its last piece drops.
            data.leak();
        } else {
            LIVE_BYTES.fetch_sub(data.len(), Ordering::Relaxed);
        }
    }
}

/// Live group allocations of one category: how many, their tensors, their bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArenaUse {
    pub category: &'static str,
    pub groups: usize,
    pub pieces: usize,
    pub bytes: usize,
}

/// Offset of each piece in a group allocation and the total: pieces of `max(bytes, 16)`
/// bytes, each starting on a 256-byte boundary (the alignment a lone allocation has).
pub(super) fn group_layout(bytes: &[usize]) -> (Vec<usize>, usize) {
    let mut offsets = Vec::with_capacity(bytes.len());
    let mut at = 0usize;
    for &b in bytes {
        offsets.push(at);
        at += b.max(16).next_multiple_of(256);
    }
    (offsets, at.max(16))
}

impl std::fmt::Debug for CudaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBuf({} x {:?})", self.len, self.dtype)
    }
}

/// One GPU, set up once per process: context, and every kernel of the embedded PTX loaded and
/// looked up.
pub(super) struct Device {
    pub(super) ctx: Arc<CudaContext>,
    /// Every kernel with its parameter signature from the PTX (see `ptx::PtxModule`).
    functions: HashMap<&'static str, (CudaFunction, &'static str)>,
    pub(super) sm_count: usize,
    pub(super) name: String,
    pub(super) compute_capability: (i32, i32),
    pub(super) driver_version: i32,
    /// `REPSHIELD_CUDA_SEPARATE=1`: `alloc_group_dtype` allocates each buffer on its own.
    separate_groups: bool,
}

/// Dynamic shared memory of the 128x128 GEMM tile (4 stages x (128 + 128) rows x 40 bf16).
pub(super) const GEMM_128_SMEM: u32 = 4 * (128 + 128) * 40 * 2;
/// Dynamic shared memory of the 128x128 `a b` GEMM tile (4 stages x (128 rows x 40 of a +
/// 32 k-rows x 136 of b) bf16).
pub(super) const GEMM_NN_128_SMEM: u32 = 4 * (128 * 40 + 32 * (128 + 8)) * 2;

/// Dynamic shared memory of both Hopper GEMMs (kernels/matmul_sm90.cu): 5 stages x (128 + 128)
/// rows x 64 bf16, plus 1024 bytes to align the ring to the 128-byte swizzle's period.
pub(super) const GEMM_WGMMA_SMEM: u32 = 5 * (128 + 128) * 64 * 2 + 1024;

/// Dynamic shared memory of both TMA Hopper GEMMs (kernels/matmul_tma_sm90.cu): 4 stages x
/// (128 + 256) rows x 64 bf16, 1024 bytes of alignment slack, 8 mbarriers of 8 bytes.
pub(super) const GEMM_TMA_SMEM: u32 = 1024 + 4 * (128 + 256) * 64 * 2 + 8 * 8;

fn devices() -> &'static Mutex<HashMap<usize, Arc<Device>>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<Device>>>> = OnceLock::new();
    DEVICES.get_or_init(Default::default)
}

/// Checks, in order, that kernels were compiled, that a driver can be loaded and that device
/// `ordinal` exists; nothing here can panic inside cudarc.
pub(super) fn probe(ordinal: usize) -> Result<()> {
    if !KERNELS_COMPILED {
        bail!("CUDA kernels not compiled: {NOT_COMPILED_REASON}");
    }
    // SAFETY: only tries to dlopen libcuda; cudarc panics on first use when it is missing,
    // which is what this check prevents.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        bail!("no CUDA driver: libcuda.so could not be loaded (no NVIDIA driver on this machine)");
    }
    let count = CudaContext::device_count()
        .map_err(|e| anyhow!("CUDA driver present but unusable: {e}"))?;
    if ordinal >= count.max(0) as usize {
        bail!("no CUDA device {ordinal}: the driver sees {count} device(s)");
    }
    Ok(())
}

impl Device {
    fn open(ordinal: usize) -> Result<Self> {
        probe(ordinal)?;
        let ctx = CudaContext::new(ordinal)
            .with_context(|| format!("creating a CUDA context on device {ordinal}"))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let compute_capability = ctx.compute_capability()?;
        if compute_capability.0 < 8 {
            bail!(
                "{name} has compute capability {}.{}; the kernels need 8.0 or newer (bf16 tensor cores, cp.async)",
                compute_capability.0,
                compute_capability.1
            );
        }
        let sm_count =
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let mut driver_version = 0;
        // SAFETY: writes one int; the driver library is loaded (probe).
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) };
        // Each backend handle queues everything on its own stream (CudaBackend::new): ops are
        // ordered, so buffers need no event tracking.
        // SAFETY: no buffer is ever used on a stream other than its handle's.
        unsafe { ctx.disable_event_tracking() };

        let mut functions = HashMap::new();
        // sm_90a code runs on compute capability 9.0 only; REPSHIELD_CUDA_NO_WGMMA=1 leaves it
        // out there too (every shape then takes the sm_80 kernels).
        let hopper = compute_capability == (9, 0)
            && !std::env::var("REPSHIELD_CUDA_NO_WGMMA").is_ok_and(|v| v == "1");
        // REPSHIELD_CUDA_NO_TMA=1 leaves out the TMA GEMMs alone (the 128x128 wgmma kernels take
        // their shapes), to tell its faults from the other Hopper kernels'.
        let no_tma = std::env::var("REPSHIELD_CUDA_NO_TMA").is_ok_and(|v| v == "1");
        for m in PTX_MODULES {
            if m.target != PTX_ARCH && !hopper || m.name == "matmul_tma_sm90" && no_tma {
                continue;
            }
            let module = match ctx.load_module(cudarc::nvrtc::Ptx::from_src(m.ptx)) {
                Ok(module) => module,
                Err(e) => {
                    let why = anyhow!(
                        "the CUDA driver ({}) rejected the PTX of kernels/{}.cu (built by nvcc {NVCC_VERSION} \
                         for {}): {e}. A driver older than the nvcc that built the PTX rejects it; \
                         build with the pinned toolchain (tools/install-cuda-toolchain.sh)",
                        driver_string(driver_version),
                        m.name,
                        m.target
                    );
                    if m.target == PTX_ARCH {
                        return Err(why);
                    }
                    // The Hopper-only kernels are a speed-up: every shape has an sm_80 kernel.
                    eprintln!(
                        "warning: {why}\nwarning: running without kernels/{}.cu: the sm_80 kernels take every shape",
                        m.name
                    );
                    continue;
                }
            };
            for &(entry, signature) in m.entries {
                let f = module.load_function(entry).with_context(|| {
                    format!("loading kernel {entry} from kernels/{}.cu", m.name)
                })?;
                functions.insert(entry, (f, signature));
            }
        }
        for (name, smem) in [
            ("matmul_bf16_128x128", GEMM_128_SMEM),
            ("gemm_nn_bf16_128x128", GEMM_NN_128_SMEM),
            ("matmul_bf16_wgmma_128x128", GEMM_WGMMA_SMEM),
            ("gemm_nn_bf16_wgmma_128x128", GEMM_WGMMA_SMEM),
            ("matmul_bf16_wgmma_tma_128x256", GEMM_TMA_SMEM),
            ("gemm_nn_bf16_wgmma_tma_128x256", GEMM_TMA_SMEM),
        ] {
            if let Some((f, _)) = functions.get(name) {
                f.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
                .with_context(|| format!("raising the shared-memory limit of {name}"))?;
            }
        }
        Ok(Self {
            ctx,
            functions,
            sm_count,
            name,
            compute_capability,
            driver_version,
            separate_groups: std::env::var("REPSHIELD_CUDA_SEPARATE").is_ok_and(|v| v == "1"),
        })
    }
}

fn driver_string(v: i32) -> String {
    if v == 0 {
        "version unknown".into()
    } else {
        format!("CUDA {}.{}", v / 1000, (v % 1000) / 10)
    }
}

/// The CUDA backend on one GPU. Cheap to clone: clones share the device, the stream and the
/// loaded kernels. Each [`CudaBackend::new`] gets a stream of its own (a non-default one, so
/// that a decode step can be captured into a CUDA graph): handles opened side by side (tests
/// running in parallel) neither order against nor capture each other's work, and must not
/// share buffers.
#[derive(Clone)]
pub struct CudaBackend {
    pub(super) dev: Arc<Device>,
    stream: Arc<CudaStream>,
    /// Flash-decoding partials of attention, grown on demand and reused: every op of the
    /// handle runs in order on its stream, so a later launch cannot overtake an earlier reader.
    pub(super) attn_scratch: Arc<Mutex<Option<CudaSlice<f32>>>>,
    /// Device address of the decode-step state (`super::graph`), 0 when none is active: while
    /// set, `embedding` reads its token, and `rope_kv_store` and `attention` their position,
    /// from there instead of from host values.
    pub(super) step: Arc<AtomicU64>,
    /// cuBLASLt's handle, workspace and GEMM plans (cublaslt.rs), created on first use so that
    /// a machine without libcublasLt still opens the device.
    #[cfg(feature = "cublaslt")]
    pub(super) cublaslt: Arc<Mutex<Option<super::cublaslt::Lt>>>,
    /// Storage of `upload` and `alloc`: bf16 normally; f32 to check kernels against the CPU
    /// without bf16 rounding.
    working: DType,
    /// Kernels launched through [`CudaBackend::launch`] by this handle and its clones (not
    /// other handles on the same device, so tests running side by side do not see each
    /// other's launches; cuBLASLt's own launches are not counted).
    launches: Arc<AtomicU64>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend({})", self.name())
    }
}

impl CudaBackend {
    /// Opens GPU `ordinal` (0 = first). Errors, never panics, when the kernels were not compiled,
    /// there is no driver or no such device, or the driver rejects the PTX. The context and
    /// modules are created once per process and device; later calls share them.
    pub fn new(ordinal: usize) -> Result<Self> {
        let mut map = devices().lock().unwrap_or_else(|p| p.into_inner());
        let dev = match map.get(&ordinal) {
            Some(d) => d.clone(),
            None => {
                let d = Arc::new(Device::open(ordinal)?);
                map.insert(ordinal, d.clone());
                d
            }
        };
        let stream = dev
            .ctx
            .new_stream()
            .context("creating the backend's CUDA stream")?;
        Ok(Self {
            dev,
            stream,
            attn_scratch: Arc::default(),
            step: Arc::default(),
            #[cfg(feature = "cublaslt")]
            cublaslt: Arc::default(),
            working: DType::BF16,
            launches: Arc::default(),
        })
    }

    /// Kernel launches so far through this handle and its clones: the difference around a
    /// forward is its launch count (a decode step's launch overhead is about this many times
    /// the launch latency, which CUDA graphs would remove).
    pub fn launches(&self) -> u64 {
        self.launches.load(Ordering::Relaxed)
    }

    /// The same device with `upload`/`alloc` storing `dtype` (f32: every kernel in full
    /// precision, for parity checks; bf16: the default).
    pub fn with_working_dtype(mut self, dtype: DType) -> Self {
        self.working = dtype;
        self
    }

    pub fn working_dtype(&self) -> DType {
        self.working
    }

    /// (major, minor) compute capability of the GPU.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.dev.compute_capability
    }

    /// Whether kernel `name` was loaded (the Hopper-only ones are, on compute capability 9.0).
    pub fn has_kernel(&self, name: &str) -> bool {
        self.dev.functions.contains_key(name)
    }

    /// Streaming multiprocessors of the GPU (launchers size grids with it).
    pub fn sm_count(&self) -> usize {
        self.dev.sm_count
    }

    /// The most bytes that `CudaBuf`s held at once since the last reset (weights, activations,
    /// gradients, optimiser state; not the driver's or cudarc's own scratch).
    pub fn peak_bytes(&self) -> usize {
        PEAK_BYTES.load(Ordering::Relaxed)
    }

    /// Starts a new peak at the bytes held now.
    pub fn reset_peak_bytes(&self) {
        PEAK_BYTES.store(LIVE_BYTES.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        Ok(self.dev.ctx.mem_get_info()?)
    }

    /// Device memory needed per category (weights, activations, KV cache, scratch) to run `cfg`
    /// on `batch` sequences of up to `ctx` tokens; see [`super::MemoryPlan`].
    pub fn memory_plan(cfg: &ModelConfig, batch: usize, ctx: usize) -> String {
        super::MemoryPlan::new(cfg, batch, ctx).to_string()
    }

    /// Allocates `len` zeroed elements of `dtype`.
    pub fn alloc_dtype(&self, len: usize, dtype: DType) -> Result<CudaBuf> {
        // Zero-length buffers still get a real allocation so that every buffer has an address.
        let bytes = (len * dtype.size()).max(16);
        let data = self
            .stream
            .alloc_zeros::<u8>(bytes)
            .with_context(|| format!("allocating {bytes} bytes on {}", self.dev.name))?;
        count_alloc(bytes);
        Ok(CudaBuf {
            data: ManuallyDrop::new(data),
            dtype,
            len,
            arena: None,
        })
    }

    /// Zeroed buffers of `(len, dtype)` each, carved from one allocation of `category`
    /// (weights, KV cache, activations): one driver allocation and one memset for the lot,
    /// every piece 256-byte aligned. The allocation is freed when its last buffer drops.
    /// With `REPSHIELD_CUDA_SEPARATE=1` in the environment each buffer gets an allocation of
    /// its own instead (so that the emulator's canaries guard every tensor).
    pub fn alloc_group_dtype(
        &self,
        category: &'static str,
        specs: &[(usize, DType)],
    ) -> Result<Vec<CudaBuf>> {
        if self.dev.separate_groups {
            return specs
                .iter()
                .map(|&(len, dtype)| self.alloc_dtype(len, dtype))
                .collect();
        }
        let bytes: Vec<usize> = specs.iter().map(|&(len, dt)| len * dt.size()).collect();
        let (offsets, total) = group_layout(&bytes);
        let slice = self.stream.alloc_zeros::<u8>(total).with_context(|| {
            format!(
                "allocating {total} bytes ({category}, {} tensors) on {}",
                specs.len(),
                self.dev.name
            )
        })?;
        count_alloc(total);
        let base = {
            let (ptr, _sync) = slice.device_ptr(&self.stream);
            ptr
        };
        let arena = Arc::new(Arena {
            slice,
            category,
            pieces: specs.len(),
        });
        {
            let mut live = arenas().lock().unwrap_or_else(|p| p.into_inner());
            live.retain(|w| w.strong_count() > 0);
            live.push(Arc::downgrade(&arena));
        }
        Ok(specs
            .iter()
            .zip(offsets)
            .zip(bytes)
            .map(|((&(len, dtype), off), b)| {
                // SAFETY: [base + off, base + off + max(b, 16)) lies inside the arena's
                // allocation (group_layout), which outlives the view (the buffer holds the
                // arena); the view is leaked, never freed, on drop.
                let view = unsafe {
                    self.stream
                        .upgrade_device_ptr::<u8>(base + off as u64, b.max(16))
                };
                CudaBuf {
                    data: ManuallyDrop::new(view),
                    dtype,
                    len,
                    arena: Some(arena.clone()),
                }
            })
            .collect())
    }

    /// Group allocations alive now, per category (what `repshield info --device cuda` prints
    /// next to the plan).
    pub fn arenas(&self) -> Vec<ArenaUse> {
        let live = arenas().lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<ArenaUse> = Vec::new();
        for a in live.iter().filter_map(Weak::upgrade) {
            match out.iter_mut().find(|u| u.category == a.category) {
                Some(u) => {
                    u.groups += 1;
                    u.pieces += a.pieces;
                    u.bytes += a.slice.len();
                }
                None => out.push(ArenaUse {
                    category: a.category,
                    groups: 1,
                    pieces: a.pieces,
                    bytes: a.slice.len(),
                }),
            }
        }
        out
    }

    /// Uploads `data` stored as `dtype` (bf16 rounds to nearest even).
    pub fn upload_dtype(&self, data: &[f32], dtype: DType) -> Result<CudaBuf> {
        let mut buf = self.alloc_dtype(data.len(), dtype)?;
        self.copy_in(data, &mut buf)?;
        Ok(buf)
    }

    /// `upload_dtype` of several tensors into one `alloc_group_dtype`.
    pub fn upload_group_dtype(
        &self,
        category: &'static str,
        data: &[(&[f32], DType)],
    ) -> Result<Vec<CudaBuf>> {
        let specs: Vec<(usize, DType)> = data.iter().map(|(d, dt)| (d.len(), *dt)).collect();
        let mut bufs = self.alloc_group_dtype(category, &specs)?;
        for ((d, _), buf) in data.iter().zip(&mut bufs) {
            self.copy_in(d, buf)?;
        }
        Ok(bufs)
    }

    /// Host `data` into `buf` (same length), converted to `buf`'s dtype.
    fn copy_in(&self, data: &[f32], buf: &mut CudaBuf) -> Result<()> {
        assert_eq!(data.len(), buf.len, "copy_in: length mismatch");
        if data.is_empty() {
            return Ok(());
        }
        let dst = &mut *buf.data;
        let res = match buf.dtype {
            DType::F32 => self
                .stream
                .memcpy_htod(bytemuck::cast_slice::<f32, u8>(data), dst),
            DType::BF16 => {
                let h: Vec<half::bf16> = data.iter().map(|&x| half::bf16::from_f32(x)).collect();
                self.stream
                    .memcpy_htod(bytemuck::cast_slice::<half::bf16, u8>(&h), dst)
            }
        };
        res.context("copying to the GPU")
    }

    /// Uploads a small index array (token ids, row lists) for one launch.
    pub(super) fn upload_u32(&self, data: &[u32]) -> CudaSlice<u32> {
        self.stream
            .clone_htod(data)
            .unwrap_or_else(|e| panic!("copying {} indices to the GPU: {e}", data.len()))
    }

    /// Milliseconds of each of `reps` runs of `f` (after one untimed warm-up), measured with
    /// CUDA events around each run; before each run a 256 MiB buffer is overwritten so that no
    /// operand is still in the L2 cache.
    pub fn time_ms_flushed(&self, f: &mut dyn FnMut(), reps: usize) -> Result<Vec<f64>> {
        use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        let mut flush = self
            .stream
            .alloc_zeros::<u8>(256 << 20)
            .context("allocating the L2 flush buffer")?;
        f();
        let mut out = Vec::with_capacity(reps);
        for _ in 0..reps {
            self.stream.memset_zeros(&mut flush)?;
            let start = self.stream.record_event(Some(CU_EVENT_DEFAULT))?;
            f();
            let end = self.stream.record_event(Some(CU_EVENT_DEFAULT))?;
            out.push(start.elapsed_ms(&end)? as f64);
        }
        crate::backend::Backend::synchronize(self)?;
        Ok(out)
    }

    /// Device-to-device copy bandwidth in GB/s (bytes read + written), median of 10 copies of
    /// 1 GiB (64 MiB when less than 4 GiB is free).
    pub fn copy_bandwidth_gbs(&self) -> Result<f64> {
        let (free, _) = self.mem_info()?;
        let bytes: usize = if free > 4 << 30 { 1 << 30 } else { 64 << 20 };
        let src = self.stream.alloc_zeros::<u8>(bytes)?;
        let mut dst = self.stream.alloc_zeros::<u8>(bytes)?;
        let stream = self.stream.clone();
        let mut err = None;
        let times = self.time_ms_flushed(
            &mut || {
                if let Err(e) = stream.memcpy_dtod(&src, &mut dst) {
                    err.get_or_insert(e);
                }
            },
            10,
        )?;
        if let Some(e) = err {
            return Err(e).context("device-to-device copy");
        }
        Ok(2.0 * bytes as f64 / (crate::bench::median(&times) * 1e-3) / 1e9)
    }

    /// Launches kernel `name` on the backend's stream after checking `args` against the
    /// kernel's PTX parameter list (count, and pointer / int / float per position). Launch
    /// errors are bugs (bad grid, missing kernel), never data conditions, so they panic like a
    /// failed precondition does on the CPU; faults inside the kernel surface at the next
    /// `download`/`synchronize` as errors.
    ///
    /// # Safety
    /// The buffers must be large enough for what the kernel reads and writes at this grid:
    /// every launcher asserts the shapes before calling this.
    pub(super) unsafe fn launch(&self, name: &str, cfg: LaunchConfig, args: &mut [Arg<'_>]) {
        let (f, signature) = self.dev.functions.get(name).unwrap_or_else(|| {
            panic!("kernel {name} is not in the embedded PTX (stale build of kernels/?)")
        });
        let given: String = args.iter().map(Arg::code).collect();
        assert_eq!(
            given, *signature,
            "launcher/kernel signature mismatch for {name} (p = 8-byte pointer or long long, i = int, f = float, d = double)"
        );
        let mut b = self.stream.launch_builder(f);
        for a in args.iter_mut() {
            match a {
                Arg::In(buf) => b.arg(&*buf.data),
                Arg::Out(buf) => b.arg(&mut *buf.data),
                Arg::U32(ids) => b.arg(&**ids),
                Arg::U32Out(ids) => b.arg(&mut **ids),
                Arg::Ptr(p) => b.arg(&*p),
                Arg::I32(v) => b.arg(&*v),
                Arg::I64(v) => b.arg(&*v),
                Arg::F32(v) => b.arg(&*v),
                Arg::F64(v) => b.arg(&*v),
                Arg::TensorMap(m) => b.arg(&*m),
            };
        }
        // SAFETY: argument count and classes match the kernel (checked above); sizes are the
        // caller's contract.
        if let Err(e) = unsafe { b.launch(cfg) } {
            panic!("launching {name}: {e}");
        }
        self.launches.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Device address of a buffer (alignment checks, optional kernel arguments).
    pub(super) fn addr(&self, buf: &CudaBuf) -> u64 {
        let (ptr, _sync) = buf.data.device_ptr(&self.stream);
        ptr
    }

    pub(super) fn addr_f32(&self, buf: &CudaSlice<f32>) -> u64 {
        let (ptr, _sync) = buf.device_ptr(&self.stream);
        ptr
    }
}

/// One kernel argument, typed so that `CudaBackend::launch` can check it against the PTX.
pub(super) enum Arg<'a> {
    In(&'a CudaBuf),
    Out(&'a mut CudaBuf),
    U32(&'a CudaSlice<u32>),
    U32Out(&'a mut CudaSlice<u32>),
    /// A raw device address (optional buffers as 0, sub-ranges of scratch).
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
    /// A TMA tensor map, passed by value (a `__grid_constant__` kernel parameter).
    TensorMap(TensorMap),
}

/// The driver's 128-byte `CUtensorMap` (cuTensorMapEncodeTiled), as a kernel parameter.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(super) struct TensorMap(pub(super) cudarc::driver::sys::CUtensorMap);

// SAFETY: plain bytes with the layout (128 bytes, 64-byte alignment) of the kernels' by-value
// `TensorMap` parameter.
unsafe impl cudarc::driver::DeviceRepr for TensorMap {}

impl Arg<'_> {
    fn code(&self) -> char {
        match self {
            Arg::In(_) | Arg::Out(_) | Arg::U32(_) | Arg::U32Out(_) | Arg::Ptr(_) | Arg::I64(_) => {
                'p'
            }
            Arg::I32(_) => 'i',
            Arg::F32(_) => 'f',
            Arg::F64(_) => 'd',
            Arg::TensorMap(_) => 'm',
        }
    }
}

/// `x` as a kernel `int`, checked.
pub(super) fn int(x: usize, what: &str) -> i32 {
    i32::try_from(x)
        .unwrap_or_else(|_| panic!("{what} = {x} does not fit a 32-bit kernel argument"))
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;

    fn name(&self) -> String {
        let d = &self.dev;
        format!(
            "cuda:{} ({}, sm_{}{}, {} SMs, driver {}, {} storage)",
            d.ctx.ordinal(),
            d.name,
            d.compute_capability.0,
            d.compute_capability.1,
            d.sm_count,
            driver_string(d.driver_version),
            self.working.suffix()
        )
    }
    fn upload(&self, data: &[f32]) -> Result<CudaBuf> {
        self.upload_dtype(data, self.working)
    }
    fn upload_f32(&self, data: &[f32]) -> Result<CudaBuf> {
        self.upload_dtype(data, DType::F32)
    }
    fn alloc(&self, len: usize) -> Result<CudaBuf> {
        self.alloc_dtype(len, self.working)
    }
    fn alloc_f32(&self, len: usize) -> Result<CudaBuf> {
        self.alloc_dtype(len, DType::F32)
    }
    fn alloc_group(&self, category: &'static str, specs: &[(usize, bool)]) -> Result<Vec<CudaBuf>> {
        let specs: Vec<(usize, DType)> = specs
            .iter()
            .map(|&(len, f32)| (len, if f32 { DType::F32 } else { self.working }))
            .collect();
        self.alloc_group_dtype(category, &specs)
    }
    fn upload_group(
        &self,
        category: &'static str,
        data: &[(&[f32], bool)],
    ) -> Result<Vec<CudaBuf>> {
        let data: Vec<(&[f32], DType)> = data
            .iter()
            .map(|&(d, f32)| (d, if f32 { DType::F32 } else { self.working }))
            .collect();
        self.upload_group_dtype(category, &data)
    }
    fn download(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        let stream = &self.stream;
        let bytes: Vec<u8> = stream
            .clone_dtoh(&*buf.data)
            .context("copying from the GPU")?;
        stream
            .synchronize()
            .context("CUDA error in a kernel queued before this download")?;
        let bytes = &bytes[..buf.bytes()];
        Ok(match buf.dtype {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
        })
    }
    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len
    }
    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .context("CUDA error in a queued kernel")
    }
    fn argmax_rows(&self, x: &CudaBuf, width: usize) -> Result<Vec<u32>> {
        self.argmax_impl(x, width)
    }
    fn generate_replayed(
        model: &crate::llama::Llama<Self>,
        prompt: &[u32],
        opts: &crate::llama::GenerateOptions,
        on_token: &mut dyn FnMut(u32) -> Result<()>,
    ) -> Option<Result<Vec<u32>>> {
        // Mixed LoRA ranks resize the step's scratch, and a recorded step must not allocate.
        model
            .uniform_lora_rank()
            .then(|| crate::llama::generate::generate_graph(model, prompt, opts, on_token))
    }
    fn sample_top_p_rows(
        &self,
        x: &CudaBuf,
        width: usize,
        temperature: f32,
        top_p: f32,
        uniforms: &[f32],
    ) -> Result<Vec<u32>> {
        self.sample_top_p_impl(x, width, temperature, top_p, uniforms)
    }

    fn embedding(&self, table: &CudaBuf, ids: &[u32], dim: usize, out: &mut CudaBuf) {
        self.embedding_impl(table, ids, dim, out)
    }
    fn rmsnorm(&self, x: &CudaBuf, w: &CudaBuf, dim: usize, eps: f32, out: &mut CudaBuf) {
        self.rmsnorm_impl(x, w, dim, eps, out)
    }
    fn add_rmsnorm(
        &self,
        residual: &mut CudaBuf,
        delta: &CudaBuf,
        w: &CudaBuf,
        dim: usize,
        eps: f32,
        out: &mut CudaBuf,
    ) {
        self.add_rmsnorm_impl(residual, delta, w, dim, eps, out)
    }
    fn matmul(
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
        self.matmul_impl(x, w, out, m, n, k, scale, accumulate)
    }
    fn matmul_lora(
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
        self.matmul_lora_impl(x, w, xa, b, out, m, n, k, rank, lora_scale)
    }
    fn rope_kv_store(
        &self,
        q: &mut CudaBuf,
        k: &mut CudaBuf,
        v: &CudaBuf,
        k_cache: &mut CudaBuf,
        v_cache: &mut CudaBuf,
        shape: AttnShape,
        inv_freq: &CudaBuf,
    ) {
        self.rope_kv_store_impl(q, k, v, k_cache, v_cache, shape, inv_freq)
    }
    fn qkv_proj(
        &self,
        x: &CudaBuf,
        w: [&CudaBuf; 3],
        lora: [crate::backend::LoraTerm<CudaBuf>; 3],
        out: [&mut CudaBuf; 3],
        m: usize,
        n: [usize; 3],
        k: usize,
    ) {
        self.qkv_proj_impl(x, w, lora, out, m, n, k)
    }
    fn gate_up_swiglu(
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
        self.gate_up_swiglu_impl(x, wg, wu, lora_g, lora_u, gate, up, act, m, n, k)
    }
    fn add_bias(&self, x: &mut CudaBuf, bias: &CudaBuf) {
        self.add_bias_impl(x, bias)
    }
    fn rope(
        &self,
        x: &mut CudaBuf,
        batch: usize,
        seq_len: usize,
        n_heads: usize,
        head_dim: usize,
        start_pos: usize,
        inv_freq: &CudaBuf,
    ) {
        self.rope_impl(x, batch, seq_len, n_heads, head_dim, start_pos, inv_freq)
    }
    fn kv_store(
        &self,
        k: &CudaBuf,
        v: &CudaBuf,
        k_cache: &mut CudaBuf,
        v_cache: &mut CudaBuf,
        shape: AttnShape,
    ) {
        self.kv_store_impl(k, v, k_cache, v_cache, shape)
    }
    fn attention(
        &self,
        q: &CudaBuf,
        k_cache: &CudaBuf,
        v_cache: &CudaBuf,
        key_mask: Option<&CudaBuf>,
        out: &mut CudaBuf,
        shape: AttnShape,
    ) {
        self.attention_impl(q, k_cache, v_cache, key_mask, out, shape)
    }
    fn swiglu(&self, gate: &CudaBuf, up: &CudaBuf, out: &mut CudaBuf) {
        self.swiglu_impl(gate, up, out)
    }
    fn dropout(&self, x: &CudaBuf, out: &mut CudaBuf, p: f32, seed: u64) {
        self.dropout_impl(x, out, p, seed)
    }
    fn gather_rows(
        &self,
        src: &CudaBuf,
        src_rows: &[u32],
        dim: usize,
        dst: &mut CudaBuf,
        dst_row: usize,
    ) {
        self.gather_rows_impl(src, src_rows, dim, dst, dst_row)
    }
}

/// The backward ops on the GPU, for training and attacks; each forwards to its launcher (see
/// docs/CUDA.md for the kernels). `attention_bwd` reruns the forward for the log-sum-exp the
/// trait does not carry; `CudaBackend::attention_bwd_with_lse` skips that.
impl BackwardOps for CudaBackend {
    fn gemm(
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
        self.gemm_impl(a, b, out, m, n, k, trans_a, trans_b, scale, accumulate)
    }
    fn rmsnorm_bwd(
        &self,
        x: &CudaBuf,
        w: &CudaBuf,
        dy: &CudaBuf,
        dim: usize,
        eps: f32,
        dx: &mut CudaBuf,
        accumulate: bool,
    ) {
        self.rmsnorm_bwd_impl(x, w, dy, dim, eps, dx, accumulate)
    }
    fn attention_bwd(
        &self,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        key_mask: Option<&CudaBuf>,
        out: &CudaBuf,
        dout: &CudaBuf,
        dq: &mut CudaBuf,
        dk: &mut CudaBuf,
        dv: &mut CudaBuf,
        shape: AttnShape,
    ) {
        self.attention_bwd_impl(q, k, v, key_mask, out, dout, dq, dk, dv, shape)
    }
    fn swiglu_bwd(
        &self,
        gate: &CudaBuf,
        up: &CudaBuf,
        dout: &CudaBuf,
        dgate: &mut CudaBuf,
        dup: &mut CudaBuf,
    ) {
        self.swiglu_bwd_impl(gate, up, dout, dgate, dup)
    }
    fn axpy(&self, alpha: f32, x: &CudaBuf, y: &mut CudaBuf) {
        self.axpy_impl(alpha, x, y)
    }
    fn kl_retain(
        &self,
        orig: &CudaBuf,
        tuned: &CudaBuf,
        mask: &[f64],
        batch: usize,
        vocab: usize,
        temperature: f64,
        weight: f64,
        grad: Option<&mut CudaBuf>,
    ) -> Result<f64> {
        // The launcher in kl.rs (an inherent method of the same name and signature).
        CudaBackend::kl_retain(
            self,
            orig,
            tuned,
            mask,
            batch,
            vocab,
            temperature,
            weight,
            grad,
        )
    }
    fn target_ce(
        &self,
        logits: &CudaBuf,
        vocab: usize,
        groups: &[&[(usize, u32)]],
        grad: Option<&mut CudaBuf>,
    ) -> Result<Vec<(f64, bool)>> {
        // The launcher in ce.rs (an inherent method of the same name and signature).
        CudaBackend::target_ce(self, logits, vocab, groups, grad)
    }
    fn pgd_step(
        &self,
        update: Update,
        e: &mut CudaBuf,
        grad: &CudaBuf,
        init: &CudaBuf,
        adam: &mut Option<DeviceAdam<CudaBuf>>,
        step: f32,
        ball: Ball,
        dim: usize,
    ) -> Result<()> {
        match update {
            Update::Sign => self.pgd_sign_step(e, grad, init, step, ball, dim),
            Update::Adam => {
                if adam.is_none() {
                    *adam = Some(DeviceAdam {
                        m: self.alloc_dtype(e.len, DType::F32)?,
                        v: self.alloc_dtype(e.len, DType::F32)?,
                        t: 0,
                    });
                }
                let st = adam.as_mut().expect("created above");
                self.pgd_adam_step(
                    e, grad, init, &mut st.m, &mut st.v, &mut st.t, step, ball, dim,
                )
            }
        }
        Ok(())
    }
    fn adamw_step(
        &self,
        cfg: &crate::train::adamw::AdamWConfig,
        t: u64,
        p: &mut CudaBuf,
        g: &CudaBuf,
        grad_scale: f32,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
    ) {
        // The launcher in adamw.rs (an inherent method of the same name and signature).
        CudaBackend::adamw_step(self, cfg, t, p, g, grad_scale, m, v)
    }
    fn row_stats(
        &self,
        x: &CudaBuf,
        y: &CudaBuf,
        y_vec: bool,
        scale: Option<&[f32]>,
        dim: usize,
    ) -> Result<Vec<[f64; 4]>> {
        self.row_stats_impl(x, y, y_vec, scale, dim)
    }
    fn row_combine(
        &self,
        out: &mut CudaBuf,
        accumulate: bool,
        x: Option<(&CudaBuf, &[f32])>,
        y: Option<(&CudaBuf, &[f32])>,
        v: Option<(&CudaBuf, &[f32])>,
        dim: usize,
    ) {
        self.row_combine_impl(out, accumulate, x, y, v, dim)
            .unwrap_or_else(|e| panic!("row_combine: {e}"))
    }
}
