//! Finding the CUDA libraries at run time.
//!
//! The binary links no CUDA library: cudarc opens them with `dlopen` when
//! first used, and panics if one is missing. So before cudarc is touched we
//! look for each library ourselves, in the usual places, and open it by its
//! full path. The dynamic loader then hands cudarc the already-loaded copy
//! when it asks for the same soname. A machine without a GPU gets an error
//! message instead of a panic, and no loader noise.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The libraries the CUDA backend needs, with the sonames to try (newest first).
const LIBS: &[(&str, &[&str])] = &[
    ("the CUDA driver (libcuda)", &["libcuda.so.1", "libcuda.so"]),
    ("NVRTC builtins", &["libnvrtc-builtins.so.13.0", "libnvrtc-builtins.so.12.9", "libnvrtc-builtins.so.12.8"]),
    ("NVRTC (libnvrtc)", &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]),
    ("cuBLASLt (libcublasLt)", &["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"]),
    ("cuBLAS (libcublas)", &["libcublas.so.13", "libcublas.so.12", "libcublas.so"]),
];

/// Directories searched, in order, before the loader's own search
/// (`LD_LIBRARY_PATH`, the ld.so cache).
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![];
    for var in ["FUSEBOX_CUDA_LIB_DIR", "CUDA_HOME", "CUDA_PATH"] {
        if let Some(v) = std::env::var_os(var) {
            let p = PathBuf::from(v);
            dirs.push(p.join("lib64"));
            dirs.push(p.join("lib"));
            dirs.push(p);
        }
    }
    // NVRTC fetched by scripts/fetch-assets.sh (compiles kernels without a GPU)
    dirs.push(crate::fixtures::assets_dir().join("nvrtc/nvidia/cu13/lib"));
    if let Some(v) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&v));
    }
    for d in [
        "/usr/local/cuda/lib64",
        "/usr/local/nvidia/lib64",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib/wsl/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs
}

fn open(path: &Path) -> bool {
    // SAFETY: loading a CUDA library runs its initialisers, which are safe to run.
    match unsafe { libloading::Library::new(path) } {
        Ok(lib) => {
            // Keep it loaded for the life of the process (cudarc reuses it by soname).
            std::mem::forget(lib);
            true
        }
        Err(_) => false,
    }
}

fn load_all() -> Result<(), String> {
    let dirs = search_dirs();
    for (what, names) in LIBS {
        let found = names.iter().any(|n| dirs.iter().map(|d| d.join(n)).any(|p| p.is_file() && open(&p)))
            || names.iter().any(|n| open(Path::new(n)));
        if !found && !what.contains("builtins") {
            return Err(format!(
                "{what} not found (looked for {} in CUDA_HOME, LD_LIBRARY_PATH, /usr/local/cuda/lib64, /usr/local/nvidia/lib64 and the system library path)",
                names.join(", ")
            ));
        }
    }
    Ok(())
}

/// Load the CUDA libraries once; the error says which one is missing.
pub fn ensure_loaded() -> Result<(), String> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED.get_or_init(load_all).clone()
}

/// Load only NVRTC (enough to compile kernels on a machine without a GPU).
pub fn ensure_nvrtc() -> Result<(), String> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let dirs = search_dirs();
            for (what, names) in &LIBS[1..3] {
                let found = names.iter().any(|n| dirs.iter().map(|d| d.join(n)).any(|p| p.is_file() && open(&p)))
                    || names.iter().any(|n| open(Path::new(n)));
                if !found && !what.contains("builtins") {
                    return Err(format!("{what} not found"));
                }
            }
            Ok(())
        })
        .clone()
}
