//! The CUDA backend.
//!
//! cudarc opens the CUDA libraries at run time ([`libs`]), so the plain
//! build includes this backend and a machine without a GPU only sees an
//! error from [`CudaBackend::new`]. Kernels are `.cu` files under
//! `crates/fusebox-core/kernels/`, compiled by NVRTC at first use and cached
//! on disk ([`compile`]).
//!
//! Conventions:
//! * activations are f32 (as on the CPU backend), weights keep their
//!   checkpoint format (bf16/f16/f32 dense or MLX affine; GGUF blocks are
//!   re-laid out as affine at upload), and the KV cache is bf16;
//! * every op is queued on one stream and never waits for the device, so a
//!   decode step can be captured as a CUDA graph ([`Backend::run_graph`]);
//! * per-step values (token ids, positions, sampling parameters) are read by
//!   the kernels from device buffers.

mod attn;
pub mod compile;
mod fused;
mod gemv;
mod gemv_tc;
pub mod libs;
mod moe_sample;
mod ops;
mod qmm;
mod timing;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    result as drv, sys, CudaContext, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtr,
};
use cudarc::nvrtc::Ptx;

use crate::backend::Backend;
use crate::dtype::DType;
use crate::kv::LayerKv;
use crate::quant::Weight;
use crate::rope::RopeStyle;
use crate::tensor::{DeviceBuf, Tensor};

/// What [`probe`] found: a usable GPU, or why not.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub memory_bytes: usize,
}

/// Look for a CUDA GPU without panicking: the libraries, the driver, a device.
pub fn probe(ordinal: usize) -> Result<DeviceInfo, String> {
    libs::ensure_loaded()?;
    drv::init().map_err(|e| format!("the CUDA driver failed to initialise ({e:?})"))?;
    let n = drv::device::get_count().map_err(|e| format!("cannot count CUDA devices ({e:?})"))?;
    if n <= 0 {
        return Err("the CUDA driver reports no GPU".into());
    }
    if ordinal >= n as usize {
        return Err(format!("there is no CUDA device {ordinal} (this machine has {n})"));
    }
    let dev = drv::device::get(ordinal as i32).map_err(|e| format!("CUDA device {ordinal}: {e:?}"))?;
    let name = drv::device::get_name(dev).unwrap_or_else(|_| "unknown GPU".into());
    let cc = |a| unsafe { drv::device::get_attribute(dev, a) }.unwrap_or(0);
    let major = cc(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR);
    let minor = cc(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR);
    let memory_bytes = unsafe { drv::device::total_mem(dev) }.unwrap_or(0);
    Ok(DeviceInfo { ordinal, name, compute_capability: (major, minor), memory_bytes })
}

/// The most arguments a kernel launch takes.
const MAX_ARGS: usize = 48;

/// Let `f` use `smem` bytes of dynamic shared memory. Above 48 KB of dynamic
/// plus static shared memory a kernel needs the attribute; set from 40 KB on,
/// which leaves room for the kernels' static arrays (at most 8 KB).
pub(crate) fn allow_dynamic_smem(f: &CudaFunction, name: &str, smem: usize) -> Result<()> {
    if smem <= 40 << 10 {
        return Ok(());
    }
    // SAFETY: a live function handle; the value is checked by the driver against the device's limit.
    unsafe {
        drv::function::set_function_attribute(
            f.cu_function(),
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
    }
    .map_err(|e| anyhow!("kernel {name}: {smem} bytes of dynamic shared memory: {e:?}"))
}

/// A kernel argument: device pointers and scalars, passed by value.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    P(u64),
    I(i32),
    F(f32),
    L(u64),
}

/// A grid launch: `(grid, block, shared bytes)`.
pub(crate) type Dims = ((u32, u32, u32), (u32, u32, u32), u32);

/// Captured graphs kept at once: the decode steps of a target and a draft
/// model and every verify size (1 to 32 rows) fit; past it the least
/// recently replayed graph is dropped.
const MAX_GRAPHS: usize = 64;

struct GraphEntry {
    runs: u32,
    /// When the entry was last used (a counter of run_graph calls).
    last_use: u64,
    graph: Option<CudaGraph>,
    /// The scratch epoch the graph was captured in: a graph holds scratch
    /// addresses, so it is re-captured after any scratch buffer moved.
    epoch: u64,
}

#[derive(Default)]
struct Graphs {
    entries: HashMap<u64, GraphEntry>,
    /// run_graph calls so far (the clock of `last_use`).
    clock: u64,
}
// SAFETY: the graph handles are only used under the backend's mutex, on the backend's stream.
unsafe impl Send for Graphs {}

pub struct CudaBackend {
    pub info: DeviceInfo,
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    arch: String,
    pub(crate) sm_count: u32,
    /// Dynamic plus static shared memory one block may opt in to (bytes).
    pub(crate) smem_optin: usize,
    modules: Vec<OnceLock<Result<Arc<CudaModule>, String>>>,
    funcs: Mutex<HashMap<&'static str, CudaFunction>>,
    blas: OnceLock<Result<CudaBlas, String>>,
    scratch: Mutex<Vec<Option<CudaSlice<u8>>>>,
    /// Bumped whenever a scratch buffer is reallocated.
    scratch_epoch: std::sync::atomic::AtomicU64,
    /// A graph capture is in progress (scratch must not grow: that waits for the device).
    capturing: std::sync::atomic::AtomicBool,
    graphs: Mutex<Graphs>,
    graphs_enabled: bool,
    /// Programmatic dependent launch (sm_90+, `FUSEBOX_PDL`, default on).
    pdl: bool,
    /// f32 KV cache instead of bf16 (`FUSEBOX_KV_DTYPE=f32`).
    kv_f32: bool,
    /// Which decode sites run fused kernels.
    policy: crate::fusion::FusionPolicy,
    /// f32 cuBLAS prefill for every weight format (`FUSEBOX_PREFILL_F32=1`).
    pub(crate) prefill_f32: bool,
    /// Prefill attention on the tensor cores (`CudaOptions::attn_tc`; `set_attn_tc` for A/B runs).
    pub(crate) attn_tc: std::sync::atomic::AtomicBool,
    /// 4-bit int_dot products of 2-16 rows on the tensor cores (`CudaOptions::gemv_tc`; `set_gemv_tc`).
    pub(crate) gemv_tc: std::sync::atomic::AtomicBool,
    /// Batching through `paged_attention` (`CudaOptions::batching`; `set_batching`).
    pub(crate) batching: std::sync::atomic::AtomicBool,
    /// Per-kernel event timing (`FUSEBOX_KERNEL_TIMING`).
    timing: Option<timing::KernelTiming>,
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if let Some(t) = &self.timing {
            if let Err(e) = t.flush() {
                eprintln!("fusebox: {e:#}");
            }
        }
    }
}

/// Precision and capture switches of the CUDA backend.
#[derive(Clone, Copy, Debug)]
pub struct CudaOptions {
    /// Capture decode steps as CUDA graphs (`FUSEBOX_CUDA_GRAPH`, default on).
    pub graphs: bool,
    /// Keep the KV cache in f32 rather than bf16 (`FUSEBOX_KV_DTYPE=f32`):
    /// exact parity with the CPU's f32 path, at twice the cache memory and a
    /// slower attention kernel.
    pub kv_f32: bool,
    /// Run prefill GEMMs in f32 (`FUSEBOX_PREFILL_F32=1`) instead of bf16
    /// tensor cores.
    pub prefill_f32: bool,
    /// Prefill attention on the tensor cores (`FUSEBOX_ATTN_TC`, default on;
    /// see `attention_tc.cu`) instead of the scalar f32 blocks.
    pub attn_tc: bool,
    /// 4-bit affine products of 5 to 32 input rows (speculative verify) on
    /// the tensor cores, bitwise the one-row GEMV's rows (`FUSEBOX_GEMV_TC`,
    /// default on; see `gemv_tc.cu`), instead of the GEMV's multi-row kernels.
    pub gemv_tc: bool,
    /// Whether the engine and the server batch sequences on this GPU through
    /// `paged_attention` (`FUSEBOX_CUDA_BATCHING`).
    pub batching: bool,
}

impl CudaOptions {
    /// The options the environment sets (unset variables take the defaults).
    pub fn from_env() -> Result<CudaOptions> {
        let kv_f32 = match std::env::var("FUSEBOX_KV_DTYPE").as_deref() {
            Err(_) | Ok("bf16") => false,
            Ok("f32") => true,
            Ok(other) => bail!("FUSEBOX_KV_DTYPE={other}: expected bf16 or f32"),
        };
        Ok(CudaOptions {
            graphs: std::env::var("FUSEBOX_CUDA_GRAPH").map(|v| v != "0").unwrap_or(true),
            kv_f32,
            prefill_f32: std::env::var("FUSEBOX_PREFILL_F32").is_ok_and(|v| v == "1"),
            attn_tc: std::env::var("FUSEBOX_ATTN_TC").map(|v| v != "0").unwrap_or(true),
            gemv_tc: std::env::var("FUSEBOX_GEMV_TC").map(|v| v != "0").unwrap_or(true),
            batching: std::env::var("FUSEBOX_CUDA_BATCHING").is_ok_and(|v| v == "1"),
        })
    }

    /// f32 KV cache and f32 prefill: the GPU computes like the CPU's f32 path.
    pub fn exact() -> CudaOptions {
        CudaOptions { graphs: true, kv_f32: true, prefill_f32: true, attn_tc: false, gemv_tc: true, batching: false }
    }
}

/// The architecture NVRTC compiles for: `sm_90a` on Hopper (for its
/// Hopper-only instructions), `sm_XY` elsewhere.
pub fn arch_for(cc: (i32, i32)) -> String {
    match cc {
        (9, 0) => "sm_90a".into(),
        (10, 0) => "sm_100a".into(),
        (a, b) => format!("sm_{a}{b}"),
    }
}

impl CudaBackend {
    /// Open GPU `ordinal` with the options the environment sets
    /// ([`CudaOptions::from_env`]). Fails (never panics) without a GPU or driver.
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        Self::with_options(ordinal, CudaOptions::from_env()?)
    }

    /// Like [`CudaBackend::new`], with CUDA graphs on or off regardless of the environment.
    pub fn with_graphs(ordinal: usize, graphs: bool) -> Result<CudaBackend> {
        Self::with_options(ordinal, CudaOptions { graphs, ..CudaOptions::from_env()? })
    }

    /// Open GPU `ordinal` with explicit options.
    pub fn with_options(ordinal: usize, opts: CudaOptions) -> Result<CudaBackend> {
        let graphs_enabled = opts.graphs;
        let info = probe(ordinal).map_err(|e| anyhow!("no CUDA device: {e}"))?;
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("CUDA context on device {ordinal}: {e:?}"))?;
        // The backend orders everything on one stream itself; cudarc's
        // per-buffer events would only add work (and break graph capture).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| anyhow!("CUDA stream: {e:?}"))?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| anyhow!("{e:?}"))? as u32;
        let smem_optin = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(|e| anyhow!("{e:?}"))? as usize;
        let timing = timing::KernelTiming::from_env()?;
        // timing brackets each kernel alone: eager launches, no overlap
        let graphs_enabled = graphs_enabled && timing.is_none();
        let pdl = timing.is_none()
            && info.compute_capability.0 >= 9
            && std::env::var("FUSEBOX_PDL").map(|v| v != "0").unwrap_or(true);
        Ok(CudaBackend {
            timing,
            arch: arch_for(info.compute_capability),
            ctx,
            stream,
            sm_count,
            smem_optin,
            modules: compile::SOURCES.iter().map(|_| OnceLock::new()).collect(),
            funcs: Mutex::new(HashMap::new()),
            blas: OnceLock::new(),
            scratch: Mutex::new(vec![]),
            scratch_epoch: std::sync::atomic::AtomicU64::new(0),
            capturing: std::sync::atomic::AtomicBool::new(false),
            graphs: Mutex::new(Graphs::default()),
            graphs_enabled,
            kv_f32: opts.kv_f32,
            policy: crate::fusion::FusionPolicy::resolve(crate::fusion::BackendKind::Cuda, &info.name)?,
            prefill_f32: opts.prefill_f32,
            attn_tc: std::sync::atomic::AtomicBool::new(opts.attn_tc),
            gemv_tc: std::sync::atomic::AtomicBool::new(opts.gemv_tc),
            batching: std::sync::atomic::AtomicBool::new(opts.batching),
            pdl,
            info,
        })
    }

    /// Whether prefill attention runs on the tensor cores (`FUSEBOX_ATTN_TC`).
    pub fn attn_tc(&self) -> bool {
        self.attn_tc.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Switch prefill attention between the tensor-core and the scalar kernels (for A/B runs and tests).
    pub fn set_attn_tc(&self, on: bool) {
        self.attn_tc.store(on, std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether 4-bit int_dot products of 2 or more rows run on the tensor cores (`FUSEBOX_GEMV_TC`).
    pub fn gemv_tc(&self) -> bool {
        self.gemv_tc.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Switch those products between `gemv_tc.cu` and the GEMV's multi-row kernels (A/B runs, tests).
    pub fn set_gemv_tc(&self, on: bool) {
        self.gemv_tc.store(on, std::sync::atomic::Ordering::Relaxed)
    }

    /// Let the engine batch sequences here through `paged_attention`
    /// (`FUSEBOX_CUDA_BATCHING`; tests of the paged kernels turn it on).
    pub fn set_batching(&self, on: bool) {
        self.batching.store(on, std::sync::atomic::Ordering::Relaxed)
    }

    /// This backend's fusion decisions (defaults, tuned file, environment).
    pub fn policy(&self) -> &crate::fusion::FusionPolicy {
        &self.policy
    }

    /// The NVRTC target, e.g. `sm_90a`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Whether decode steps are captured as CUDA graphs (`FUSEBOX_CUDA_GRAPH`).
    pub fn graphs_enabled(&self) -> bool {
        self.graphs_enabled
    }

    fn module(&self, file: &str) -> Result<Arc<CudaModule>> {
        let i =
            compile::SOURCES.iter().position(|(n, _)| *n == file).ok_or_else(|| anyhow!("no kernel file {file}"))?;
        self.modules[i]
            .get_or_init(|| {
                let image = compile::cubin(file, &self.arch).map_err(|e| format!("{e:#}"))?;
                self.ctx.load_module(Ptx::from_binary(image)).map_err(|e| format!("loading kernels/{file}: {e:?}"))
            })
            .clone()
            .map_err(|e| anyhow!("{e}"))
    }

    /// The kernel `name` from kernel file `file` (compiled on first use).
    pub(crate) fn func(&self, file: &'static str, name: &'static str) -> Result<CudaFunction> {
        if let Some(f) = self.funcs.lock().unwrap().get(name) {
            return Ok(f.clone());
        }
        let m = self.module(file)?;
        let f = m.load_function(name).map_err(|e| anyhow!("kernel {name} in kernels/{file}: {e:?}"))?;
        self.funcs.lock().unwrap().insert(name, f.clone());
        Ok(f)
    }

    /// Queue a kernel on the backend's stream.
    pub(crate) fn launch(&self, file: &'static str, name: &'static str, dims: Dims, args: &[Arg]) -> Result<()> {
        let Some(t) = &self.timing else { return self.launch_untimed(file, name, dims, args) };
        let start = t.start(self.stream.cu_stream())?;
        self.launch_untimed(file, name, dims, args)?;
        t.end(name, start, self.stream.cu_stream())
    }

    fn launch_untimed(&self, file: &'static str, name: &'static str, dims: Dims, args: &[Arg]) -> Result<()> {
        let f = self.func(file, name)?;
        let ((gx, gy, gz), block, smem) = dims;
        if gx == 0 || gy == 0 || gz == 0 {
            return Ok(());
        }
        ensure!(args.len() <= MAX_ARGS, "kernel {name}: {} arguments (at most {MAX_ARGS})", args.len());
        let mut slots = [0u64; MAX_ARGS];
        let mut ptrs = [std::ptr::null_mut::<std::ffi::c_void>(); MAX_ARGS];
        for (i, a) in args.iter().enumerate() {
            slots[i] = match *a {
                Arg::P(p) | Arg::L(p) => p,
                Arg::I(v) => v as u32 as u64,
                Arg::F(v) => v.to_bits() as u64,
            };
        }
        for i in 0..args.len() {
            ptrs[i] = (&mut slots[i]) as *mut u64 as *mut std::ffi::c_void;
        }
        allow_dynamic_smem(&f, name, smem as usize)?;
        if self.pdl {
            // Programmatic dependent launch (Hopper): the next kernel is
            // scheduled while this one finishes, and waits for it in
            // FB_PROLOGUE() (every kernel's first statement), which hides
            // most of the launch gap between small decode kernels.
            // SAFETY: zeroed is a valid bit pattern for this plain C struct.
            let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attr.value.programmaticStreamSerializationAllowed = 1;
            let cfg = sys::CUlaunchConfig {
                gridDimX: gx,
                gridDimY: gy,
                gridDimZ: gz,
                blockDimX: block.0,
                blockDimY: block.1,
                blockDimZ: block.2,
                sharedMemBytes: smem,
                hStream: self.stream.cu_stream(),
                attrs: &mut attr,
                numAttrs: 1,
            };
            // SAFETY: as below; the config outlives the call.
            return unsafe { sys::cuLaunchKernelEx(&cfg, f.cu_function(), ptrs.as_mut_ptr(), std::ptr::null_mut()) }
                .result()
                .map_err(|e| anyhow!("launching {name}: {e:?}"));
        }
        // SAFETY: every kernel's parameters are 4- or 8-byte scalars or
        // pointers, passed in the order its signature declares.
        unsafe {
            drv::launch_kernel(
                f.cu_function(),
                (gx, gy, gz),
                block,
                smem,
                self.stream.cu_stream(),
                &mut ptrs[..args.len()],
            )
        }
        .map_err(|e| anyhow!("launching {name}: {e:?}"))
    }

    /// Allocate `bytes` of device memory (zeroed).
    pub(crate) fn alloc(&self, bytes: usize) -> Result<DeviceBuf> {
        let s: CudaSlice<u8> = self
            .stream
            // padded: vectorised kernels may read a few bytes past the end of
            // a row of scales; those reads stay inside the allocation
            .alloc_zeros::<u8>(bytes.div_ceil(256) * 256 + 256)
            .map_err(|e| anyhow!("allocating {bytes} bytes on the GPU: {e:?}"))?;
        let ptr = {
            let (p, _sync) = s.device_ptr(&self.stream);
            p
        };
        Ok(DeviceBuf { ptr, len: bytes, owner: Arc::new(s) })
    }

    /// A scratch buffer of at least `bytes` (slot `i`), reused across calls.
    /// Only for prefill-sized work outside captured graphs.
    pub(crate) fn scratch(&self, i: usize, bytes: usize) -> Result<u64> {
        let mut s = self.scratch.lock().unwrap();
        if s.len() <= i {
            s.resize_with(i + 1, || None);
        }
        let small = s[i].as_ref().is_none_or(|b| b.len() < bytes);
        if small {
            // the first run of every graph key is eager and sizes what it uses, so a
            // capture that needs more is a bug: say so rather than break the capture
            ensure!(
                !self.capturing.load(std::sync::atomic::Ordering::SeqCst),
                "scratch slot {i} would grow to {bytes} bytes inside a CUDA graph capture"
            );
            s[i] = None;
            self.stream.synchronize().map_err(|e| anyhow!("{e:?}"))?;
            s[i] = Some(self.stream.alloc_zeros::<u8>(bytes).map_err(|e| anyhow!("scratch of {bytes} bytes: {e:?}"))?);
            self.scratch_epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        let (p, _g) = s[i].as_ref().unwrap().device_ptr(&self.stream);
        Ok(p)
    }

    pub(crate) fn blas(&self) -> Result<&CudaBlas> {
        self.blas
            .get_or_init(|| CudaBlas::new(self.stream.clone()).map_err(|e| format!("cuBLAS: {e:?}")))
            .as_ref()
            .map_err(|e| anyhow!("{e}"))
    }

    fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| anyhow!("CUDA: {e:?}"))
    }

    fn copy_htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        unsafe { drv::memcpy_htod_async(dst, src, self.stream.cu_stream()) }.map_err(|e| anyhow!("copy to GPU: {e:?}"))
    }

    fn copy_dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        unsafe { drv::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| anyhow!("copy from GPU: {e:?}"))?;
        self.sync()
    }

    /// A device tensor's address, with the error naming the op.
    pub(crate) fn ptr(t: &Tensor, op: &str) -> Result<u64> {
        t.device_ptr().with_context(|| format!("cuda {op}"))
    }
}

/// The dtype tag kernels take for float tensors: 0 f32, 1 f16, 2 bf16.
pub(crate) fn dtype_tag(d: DType) -> Result<i32> {
    Ok(match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        d => bail!("expected a float tensor, got {d}"),
    })
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        format!("cuda:{} ({}, {})", self.info.ordinal, self.info.name, self.arch)
    }

    fn device_name(&self) -> String {
        self.info.name.clone()
    }

    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        Tensor::from_device(shape, dtype, self.alloc(n * dtype.size())?)
    }

    fn upload(&self, t: Tensor) -> Result<Tensor> {
        if t.is_device() {
            return Ok(t);
        }
        let buf = self.alloc(t.size_bytes())?;
        self.copy_htod(buf.ptr, t.host_bytes()?)?;
        Tensor::from_device(t.shape(), t.dtype(), buf)
    }

    fn read_f32(&self, t: &Tensor, out: &mut Vec<f32>) -> Result<()> {
        if !t.is_device() {
            out.clear();
            out.extend(t.to_f32_vec()?);
            return Ok(());
        }
        let p = t.device_ptr()?;
        match t.dtype() {
            DType::F32 => {
                out.resize(t.numel(), 0.0);
                self.copy_dtoh(bytemuck::cast_slice_mut(out.as_mut_slice()), p)
            }
            DType::BF16 | DType::F16 => {
                let mut raw = vec![0u16; t.numel()];
                self.copy_dtoh(bytemuck::cast_slice_mut(raw.as_mut_slice()), p)?;
                let host = Tensor::from_bytes(t.shape(), t.dtype(), bytemuck::cast_slice(&raw))?;
                out.clear();
                out.extend(host.to_f32_vec()?);
                Ok(())
            }
            d => bail!("read_f32: cannot read a {d} tensor as f32"),
        }
    }

    fn run_graph(&self, key: u64, f: &mut (dyn FnMut() -> Result<()> + Send)) -> Result<()> {
        if !self.graphs_enabled {
            return f();
        }
        // a fused site switched on or off changes the kernels of the step
        let key = key ^ self.policy.bits().wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut g = self.graphs.lock().unwrap();
        if g.entries.len() >= MAX_GRAPHS && !g.entries.contains_key(&key) {
            // evict the least recently used graph
            if let Some(old) = g.entries.iter().min_by_key(|(_, e)| e.last_use).map(|(&k, _)| k) {
                g.entries.remove(&old);
            }
        }
        g.clock += 1;
        let now = g.clock;
        let epoch = self.scratch_epoch.load(std::sync::atomic::Ordering::SeqCst);
        let e = g.entries.entry(key).or_insert(GraphEntry { runs: 0, last_use: now, graph: None, epoch });
        e.last_use = now;
        if e.epoch != epoch {
            // a scratch buffer the graph points into was reallocated
            *e = GraphEntry { runs: 0, last_use: now, graph: None, epoch };
        }
        if let Some(graph) = &e.graph {
            return graph.launch().map_err(|e| anyhow!("CUDA graph replay: {e:?}"));
        }
        e.runs += 1;
        if e.runs < 2 {
            // the first run is eager: kernels compile and load outside any capture
            return f();
        }
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| anyhow!("CUDA graph capture: {e:?}"))?;
        self.capturing.store(true, std::sync::atomic::Ordering::SeqCst);
        let r = f();
        self.capturing.store(false, std::sync::atomic::Ordering::SeqCst);
        let graph = self.stream.end_capture(sys::CUgraphInstantiate_flags(0));
        r?;
        let graph = graph
            .map_err(|e| anyhow!("CUDA graph capture: {e:?}"))?
            .ok_or_else(|| anyhow!("CUDA graph capture recorded nothing"))?;
        graph.launch().map_err(|e| anyhow!("CUDA graph launch: {e:?}"))?;
        e.graph = Some(graph);
        Ok(())
    }

    fn write_i32(&self, t: &mut Tensor, data: &[i32]) -> Result<()> {
        ensure!(
            t.dtype() == DType::I32 && data.len() <= t.numel(),
            "write_i32: {} values into {:?} {}",
            data.len(),
            t.shape(),
            t.dtype()
        );
        if !t.is_device() {
            t.as_i32_mut()?[..data.len()].copy_from_slice(data);
            return Ok(());
        }
        self.copy_htod(t.device_ptr()?, bytemuck::cast_slice(data))
    }

    fn write_f32(&self, t: &mut Tensor, data: &[f32]) -> Result<()> {
        ensure!(
            t.dtype() == DType::F32 && data.len() <= t.numel(),
            "write_f32: {} values into {:?} {}",
            data.len(),
            t.shape(),
            t.dtype()
        );
        self.copy_htod(Self::ptr(t, "write_f32")?, bytemuck::cast_slice(data))
    }

    fn read_i32(&self, t: &Tensor, out: &mut Vec<i32>) -> Result<()> {
        ensure!(t.dtype() == DType::I32, "read_i32: tensor is {}", t.dtype());
        out.resize(t.numel(), 0);
        self.copy_dtoh(bytemuck::cast_slice_mut(out.as_mut_slice()), Self::ptr(t, "read_i32")?)
    }

    fn synchronize(&self) -> Result<()> {
        self.sync()?;
        match &self.timing {
            Some(t) => t.flush(),
            None => Ok(()),
        }
    }

    fn kv_dtype(&self) -> DType {
        if self.kv_f32 {
            DType::F32
        } else {
            DType::BF16
        }
    }

    fn upload_weight(&self, w: Weight) -> Result<Weight> {
        self.upload_weight_impl(w)
    }

    fn fill_random(&self, t: &mut Tensor, seed: u64, lo: f32, hi: f32) -> Result<()> {
        self.fill_random_impl(t, seed, lo, hi)
    }

    fn copy_bandwidth(&self) -> Result<f64> {
        self.copy_bandwidth_impl()
    }

    fn embedding(&self, table: &Weight, ids: &Tensor, out: &mut Tensor) -> Result<()> {
        self.embedding_impl(table, ids, out)
    }
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32, out: &mut Tensor) -> Result<()> {
        self.rms_norm_impl(x, w, eps, out)
    }
    fn matmul(&self, x: &Tensor, w: &Weight, out: &mut Tensor) -> Result<()> {
        self.matmul_impl(x, w, out)
    }
    fn expert_matmul(&self, x: &Tensor, w: &Weight, ids: &Tensor, out: &mut Tensor) -> Result<()> {
        self.expert_matmul_impl(x, w, ids, out)
    }
    fn topk_router(&self, logits: &Tensor, renormalize: bool, ids: &mut Tensor, weights: &mut Tensor) -> Result<()> {
        self.topk_router_impl(logits, renormalize, ids, weights)
    }
    fn moe_combine(&self, y: &Tensor, weights: &Tensor, out: &mut Tensor) -> Result<()> {
        self.moe_combine_impl(y, weights, out)
    }
    fn rope(&self, x: &mut Tensor, positions: &Tensor, inv_freq: &Tensor, style: RopeStyle) -> Result<()> {
        self.rope_impl(x, positions, inv_freq, style)
    }
    fn kv_write(&self, k: &Tensor, v: &Tensor, positions: &Tensor, cache: &mut LayerKv) -> Result<()> {
        self.kv_write_impl(k, v, positions, cache)
    }
    fn attention(&self, q: &Tensor, cache: &LayerKv, positions: &Tensor, scale: f32, out: &mut Tensor) -> Result<()> {
        self.attention_impl(q, cache, positions, scale, out)
    }
    fn paged_attention(
        &self,
        q: &Tensor,
        cache: &LayerKv,
        pages: &crate::kv::Pages,
        scale: f32,
        out: &mut Tensor,
    ) -> Result<()> {
        self.paged_attention_impl(q, cache, pages, scale, out)
    }
    /// Only with `FUSEBOX_CUDA_BATCHING=1` until the GPU tests of
    /// `paged_attention` have passed (cuda_attention
    /// `paged_attention_is_bitwise_contiguous_attention_per_row`, cuda_batch):
    /// the engine and the server keep one request at a time on CUDA otherwise.
    fn has_paged_attention(&self) -> bool {
        self.batching.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn free_memory(&self) -> Option<usize> {
        self.ctx.mem_get_info().ok().map(|(free, _)| free)
    }
    fn qkv_rope(
        &self,
        h: &Tensor,
        a: &crate::backend::AttnIn,
        b: &mut crate::backend::AttnBufs,
        cache: &mut LayerKv,
    ) -> Result<()> {
        self.qkv_rope_impl(h, a, b, cache)
    }
    fn rope_kv_append(
        &self,
        a: &crate::backend::AttnIn,
        b: &mut crate::backend::AttnBufs,
        cache: &mut LayerKv,
    ) -> Result<()> {
        self.rope_kv_append_impl(a, b, cache)
    }
    fn moe_experts(
        &self,
        h: &Tensor,
        e: &crate::backend::MoeIn,
        b: &mut crate::backend::MoeBufs,
        out: &mut Tensor,
    ) -> Result<()> {
        self.moe_experts_impl(h, e, b, out)
    }
    fn swiglu(&self, h: &Tensor, gate: &Weight, up: &Weight, b: &mut crate::backend::SwigluBufs) -> Result<()> {
        self.swiglu_impl(h, gate, up, b)
    }
    fn dflash_attn(
        &self,
        h: &Tensor,
        a: &crate::backend::AttnIn,
        b: &mut crate::backend::AttnBufs,
        c: &mut crate::backend::DraftAttn,
    ) -> Result<()> {
        self.dflash_attn_impl(h, a, b, c)
    }
    fn silu_mul(&self, gate: &Tensor, up: &Tensor, out: &mut Tensor) -> Result<()> {
        self.silu_mul_impl(gate, up, out)
    }
    fn fusion_policy(&self) -> Option<&crate::fusion::FusionPolicy> {
        Some(&self.policy)
    }
    fn add_rms_norm(&self, x: &mut Tensor, y: &Tensor, w: &Tensor, eps: f32, out: &mut Tensor) -> Result<()> {
        self.add_rms_norm_impl(x, y, w, eps, out)
    }
    fn add_assign(&self, x: &mut Tensor, y: &Tensor) -> Result<()> {
        self.add_assign_impl(x, y)
    }
    fn softmax(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        self.softmax_impl(x, out)
    }
    fn argmax(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        self.argmax_impl(x, out)
    }
    fn copy_rows(&self, src: &Tensor, src_row: usize, dst: &mut Tensor, dst_row: usize, n: usize) -> Result<()> {
        self.copy_rows_impl(src, src_row, dst, dst_row, n)
    }
    fn copy_cols(&self, src: &Tensor, dst: &mut Tensor, col: usize) -> Result<()> {
        self.copy_cols_impl(src, dst, col)
    }
    fn sample(
        &self,
        logits: &Tensor,
        params: &Tensor,
        history: &mut Tensor,
        state: &mut Tensor,
        out: &mut Tensor,
    ) -> Result<()> {
        self.sample_impl(logits, params, history, state, out)
    }
}

/// The GPU for a test, or `None` (with the reason printed) when there is
/// none. With `FUSEBOX_REQUIRE_CUDA=1` a missing GPU fails the test instead.
pub fn backend_for_tests() -> Option<CudaBackend> {
    backend_for_tests_with_graphs(true)
}

/// [`backend_for_tests`] with CUDA graphs on or off.
pub fn backend_for_tests_with_graphs(graphs: bool) -> Option<CudaBackend> {
    match CudaBackend::with_graphs(0, graphs) {
        Ok(b) => Some(b),
        Err(e) => {
            if std::env::var("FUSEBOX_REQUIRE_CUDA").is_ok_and(|v| v == "1") {
                panic!("FUSEBOX_REQUIRE_CUDA=1 but the CUDA backend is unavailable: {e:#}");
            }
            eprintln!("skipped: {e:#}");
            None
        }
    }
}
