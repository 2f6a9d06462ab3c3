//! `FUSEBOX_KERNEL_TIMING=FILE`: every kernel timed by a pair of CUDA events,
//! one `name,microseconds` line per launch appended to FILE, in launch order.
//! It is the per-kernel trace of `scripts/capture-decode-trace.sh` on a
//! machine without Nsight Compute. While it is set, kernels are launched
//! eagerly (no CUDA graphs) and without programmatic dependent launch, so
//! each event pair brackets one kernel alone.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{anyhow, Context, Result};
use cudarc::driver::{result as drv, sys};

/// Events recorded but not yet read back, flushed at this many.
const BATCH: usize = 4096;

pub(crate) struct KernelTiming {
    path: PathBuf,
    pending: Mutex<Vec<(&'static str, sys::CUevent, sys::CUevent)>>,
}

// SAFETY: the event handles are only used under the mutex, on the backend's stream.
unsafe impl Send for KernelTiming {}
unsafe impl Sync for KernelTiming {}

impl KernelTiming {
    /// The timer `FUSEBOX_KERNEL_TIMING` asks for (its file truncated), if any.
    pub fn from_env() -> Result<Option<KernelTiming>> {
        let Some(p) = std::env::var_os("FUSEBOX_KERNEL_TIMING").filter(|p| !p.is_empty()) else { return Ok(None) };
        let path = PathBuf::from(p);
        std::fs::write(&path, "kernel,us\n").with_context(|| format!("FUSEBOX_KERNEL_TIMING: {}", path.display()))?;
        Ok(Some(KernelTiming { path, pending: Mutex::new(vec![]) }))
    }

    fn event() -> Result<sys::CUevent> {
        drv::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(|e| anyhow!("kernel timing event: {e:?}"))
    }

    /// Record the start event of a launch.
    pub fn start(&self, stream: sys::CUstream) -> Result<sys::CUevent> {
        let e = Self::event()?;
        // SAFETY: a live event on the backend's live stream.
        unsafe { drv::event::record(e, stream) }.map_err(|e| anyhow!("kernel timing: {e:?}"))?;
        Ok(e)
    }

    /// Record the end event of launch `name` begun at `start`.
    pub fn end(&self, name: &'static str, start: sys::CUevent, stream: sys::CUstream) -> Result<()> {
        let e = Self::event()?;
        // SAFETY: as in `start`.
        unsafe { drv::event::record(e, stream) }.map_err(|e| anyhow!("kernel timing: {e:?}"))?;
        let full = {
            let mut p = self.pending.lock().unwrap();
            p.push((name, start, e));
            p.len() >= BATCH
        };
        if full {
            self.flush()?;
        }
        Ok(())
    }

    /// Wait for the recorded launches and append their times to the file.
    pub fn flush(&self) -> Result<()> {
        let done: Vec<_> = std::mem::take(&mut *self.pending.lock().unwrap());
        let mut text = String::new();
        for (name, a, b) in done {
            // SAFETY: both events were created and recorded on one stream and are destroyed only here.
            let ms = unsafe {
                let r = drv::event::synchronize(b).and_then(|_| drv::event::elapsed(a, b));
                let _ = drv::event::destroy(a);
                let _ = drv::event::destroy(b);
                r
            }
            .map_err(|e| anyhow!("kernel timing: {e:?}"))?;
            text.push_str(&format!("{name},{:.3}\n", ms * 1000.0));
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .with_context(|| format!("FUSEBOX_KERNEL_TIMING: {}", self.path.display()))?;
        f.write_all(text.as_bytes()).with_context(|| format!("writing {}", self.path.display()))
    }
}
