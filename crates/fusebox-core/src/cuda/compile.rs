//! Kernel sources, NVRTC compilation, and the on-disk cubin cache.
//!
//! Each op family is one `.cu` file under `crates/fusebox-core/kernels/`,
//! embedded in the binary. A file is compiled the first time one of its
//! kernels is needed, for the device's own architecture (`sm_90a` on
//! Hopper), to a cubin. The cubin is cached under
//! `~/.cache/fusebox/kernels/` (or `$FUSEBOX_KERNEL_CACHE`), keyed by a hash
//! of the expanded source, the architecture, the options and the NVRTC
//! version, so a changed kernel is never served stale.

use std::ffi::{c_char, CString};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};

/// Shared headers, spliced in where a source says `#include "name"`.
const HEADERS: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../../kernels/common.cuh")),
    ("gemv.cuh", include_str!("../../kernels/gemv.cuh")),
    ("attn.cuh", include_str!("../../kernels/attn.cuh")),
];

/// The kernel files, one per op family.
pub const SOURCES: &[(&str, &str)] = &[
    ("elementwise.cu", include_str!("../../kernels/elementwise.cu")),
    ("norm_rope.cu", include_str!("../../kernels/norm_rope.cu")),
    ("gemv.cu", include_str!("../../kernels/gemv.cu")),
    ("gemv_tc.cu", include_str!("../../kernels/gemv_tc.cu")),
    ("attention.cu", include_str!("../../kernels/attention.cu")),
    ("attention_tc.cu", include_str!("../../kernels/attention_tc.cu")),
    ("moe.cu", include_str!("../../kernels/moe.cu")),
    ("sample.cu", include_str!("../../kernels/sample.cu")),
    ("fused.cu", include_str!("../../kernels/fused.cu")),
    ("qmm.cu", include_str!("../../kernels/qmm.cu")),
];

/// NVRTC options shared by every file (the architecture is added per device).
pub const OPTIONS: &[&str] = &["--std=c++17", "-default-device", "-lineinfo", "--extra-device-vectorization"];

/// The source of a kernel file with its `#include "..."` lines expanded.
pub fn expanded_source(file: &str) -> Result<String> {
    let src =
        SOURCES.iter().find(|(n, _)| *n == file).map(|(_, s)| *s).ok_or_else(|| anyhow!("no kernel file {file}"))?;
    let mut out = String::with_capacity(src.len() + 8192);
    for line in src.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("#include \"") {
            let name = rest.trim_end_matches('"');
            let h = HEADERS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s);
            let h = h.ok_or_else(|| anyhow!("kernels/{file}: unknown header {name}"))?;
            out.push_str(h);
            out.push('\n');
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}

/// 64-bit FNV-1a: a stable hash for cache keys.
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for &b in p.iter().chain([0xffu8].iter()) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FUSEBOX_KERNEL_CACHE") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(home.join("fusebox").join("kernels"))
}

fn nvrtc_version() -> (i32, i32) {
    let (mut a, mut b) = (0, 0);
    // SAFETY: plain out-parameters.
    unsafe {
        let _ = nvrtc_sys::nvrtcVersion(&mut a, &mut b);
    }
    (a, b)
}

/// Compile `file` for `arch` (e.g. `sm_90a`) to a cubin, or PTX when `ptx`.
/// Returns the image and NVRTC's log (warnings, and with `-Xptxas -v` the
/// register report).
pub fn compile(file: &str, arch: &str, extra: &[&str], ptx: bool) -> Result<(Vec<u8>, String)> {
    let src = expanded_source(file)?;
    let csrc = CString::new(src).map_err(|_| anyhow!("kernels/{file} contains a NUL byte"))?;
    let cname = CString::new(file).unwrap();
    let prog = nvrtc::create_program(&csrc, Some(&cname)).map_err(|e| anyhow!("NVRTC: {e:?}"))?;
    let mut opts: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    opts.push(format!("--gpu-architecture={arch}"));
    opts.extend(extra.iter().map(|s| s.to_string()));
    // SAFETY: prog is a live program; options are valid C strings.
    let res = unsafe { nvrtc::compile_program(prog, &opts) };
    let log = unsafe { nvrtc::get_program_log(prog) }.unwrap_or_default();
    let log: String = {
        let bytes: Vec<u8> = log.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    if res.is_err() {
        unsafe {
            let _ = nvrtc::destroy_program(prog);
        }
        bail!("NVRTC failed to compile crates/fusebox-core/kernels/{file} for {arch}:\n{log}");
    }
    let image = unsafe {
        if ptx {
            let p = nvrtc::get_ptx(prog).map_err(|e| anyhow!("NVRTC get_ptx: {e:?}"))?;
            p.iter().map(|&c| c as u8).collect::<Vec<u8>>()
        } else {
            let mut n = 0usize;
            nvrtc_sys::nvrtcGetCUBINSize(prog, &mut n).result().map_err(|e| anyhow!("NVRTC cubin size: {e:?}"))?;
            let mut buf = vec![0u8; n];
            nvrtc_sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char)
                .result()
                .map_err(|e| anyhow!("NVRTC cubin: {e:?}"))?;
            buf
        }
    };
    unsafe {
        let _ = nvrtc::destroy_program(prog);
    }
    Ok((image, log))
}

/// Preprocessor switches the environment sets (read once):
/// `FUSEBOX_GEMV_PREFETCH=0` defines `FB_GEMV_NO_PREFETCH` (gemv.cuh), and
/// `FUSEBOX_NVRTC_DEFINES` adds `-DNAME[=VALUE]` switches of its own (kernel
/// experiments: variants of a compile-time parameter A/B'd in one binary).
fn env_defines() -> &'static [String] {
    static D: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    D.get_or_init(|| {
        let mut d = vec![];
        match std::env::var("FUSEBOX_GEMV_PREFETCH").as_deref().map(str::trim) {
            Ok("0") => d.push("-DFB_GEMV_NO_PREFETCH".to_string()),
            Ok("1") | Err(_) => {}
            Ok(v) => eprintln!("fusebox: FUSEBOX_GEMV_PREFETCH={v}: expected 0 or 1; keeping the prefetch"),
        }
        if let Ok(v) = std::env::var("FUSEBOX_NVRTC_DEFINES") {
            for t in v.split_whitespace() {
                match nvrtc_define(t) {
                    Some(def) => d.push(def),
                    None => {
                        eprintln!("fusebox: FUSEBOX_NVRTC_DEFINES: \"{t}\" is not -DNAME or -DNAME=VALUE; left out")
                    }
                }
            }
        }
        d
    })
}

/// `t` as an NVRTC define when it is `-DNAME` or `-DNAME=VALUE` (NAME an
/// identifier, VALUE letters, digits, `_`, `.`, `+`, `-`): nothing that could
/// be read as another compiler option.
fn nvrtc_define(t: &str) -> Option<String> {
    let body = t.strip_prefix("-D")?;
    let (name, value) = body.split_once('=').unwrap_or((body, ""));
    let ident = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    let value_ok = value.chars().all(|c| c.is_ascii_alphanumeric() || "_.+-".contains(c));
    (ident && value_ok && !(body.contains('=') && value.is_empty())).then(|| t.to_string())
}

/// A cubin for `file` on `arch`, from the disk cache or freshly compiled.
pub fn cubin(file: &str, arch: &str) -> Result<Vec<u8>> {
    let src = expanded_source(file)?;
    let (va, vb) = nvrtc_version();
    let ver = format!("{va}.{vb}");
    let defines = env_defines();
    let opts = format!("{} {}", OPTIONS.join(" "), defines.join(" "));
    let key = fnv1a(&[src.as_bytes(), arch.as_bytes(), opts.as_bytes(), ver.as_bytes()]);
    let stem = file.trim_end_matches(".cu");
    let path = cache_dir().map(|d| d.join(format!("{stem}-{arch}-{key:016x}.cubin")));
    if let Some(p) = &path {
        if let Ok(b) = std::fs::read(p) {
            if !b.is_empty() {
                return Ok(b);
            }
        }
    }
    let extra: Vec<&str> = defines.iter().map(|s| s.as_str()).collect();
    let (image, _log) = compile(file, arch, &extra, false)?;
    if let Some(p) = &path {
        // Best effort: a read-only home directory only costs a recompile next time.
        if let Some(dir) = p.parent() {
            if std::fs::create_dir_all(dir).is_ok() {
                let tmp = p.with_extension(format!("tmp{}", std::process::id()));
                if std::fs::write(&tmp, &image).is_ok() {
                    let _ = std::fs::rename(&tmp, p).with_context(|| format!("caching {}", p.display()));
                }
            }
        }
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::nvrtc_define;

    #[test]
    fn only_plain_defines_pass() {
        for ok in ["-DFB_X", "-DFB_QMM_DEPTH_N1=6", "-D_A=1.5", "-DB=-2"] {
            assert_eq!(nvrtc_define(ok).as_deref(), Some(ok));
        }
        for bad in ["FB_X", "-D", "-D1X", "-DX=", "-DX=a b", "-DX=$(y)", "--use_fast_math", "-DX;Y", "-IX"] {
            assert_eq!(nvrtc_define(bad), None, "{bad}");
        }
    }
}
