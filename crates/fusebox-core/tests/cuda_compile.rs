//! Every kernel file compiles under NVRTC for Hopper (sm_90a) and Ampere
//! (sm_80), without a GPU: only libnvrtc is needed (scripts/fetch-assets.sh
//! fetches it). ptxas' resource report is printed (`--nocapture`), and a
//! kernel that spills registers to local memory fails the test.

use fusebox_core::cuda::{compile, libs};

/// Whether libnvrtc loads; without it a test skips with the reason, or fails
/// under `FUSEBOX_REQUIRE_CUDA=1`.
fn nvrtc_present() -> bool {
    match libs::ensure_nvrtc() {
        Ok(_) => true,
        Err(e) if std::env::var("FUSEBOX_REQUIRE_CUDA").is_ok_and(|v| v == "1") => {
            panic!("FUSEBOX_REQUIRE_CUDA=1 but NVRTC is unavailable: {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e} (run scripts/fetch-assets.sh)");
            false
        }
    }
}

/// Kernels are launched with programmatic dependent launch, so each must
/// wait for its predecessor first (FB_PROLOGUE in common.cuh).
#[test]
fn every_kernel_starts_with_the_prologue() {
    let mut missing = vec![];
    for (file, src) in compile::SOURCES {
        let mut rest = *src;
        while let Some(i) = rest.find("extern \"C\" __global__") {
            let after = &rest[i..];
            let name = after.split('(').next().unwrap_or("").split_whitespace().last().unwrap_or("?").to_string();
            let brace = after.find('{').expect("kernel body");
            // (inside a macro the body may start on the next line, after a backslash)
            let body = after[brace + 1..].trim_start_matches(|c: char| c.is_whitespace() || c == '\\');
            // a deferred prologue is allowed where the file's code waits with fb_grid_wait() (the GEMV core)
            let deferred = body.starts_with("FB_PROLOGUE_DEFERRED();")
                && compile::expanded_source(file).unwrap().contains("fb_grid_wait();");
            if !body.starts_with("FB_PROLOGUE();") && !deferred {
                missing.push(format!("{file}: {name}"));
            }
            rest = &after[brace..];
        }
    }
    assert!(missing.is_empty(), "kernels without FB_PROLOGUE() (run tools/add-prologue.py): {missing:?}");
}

#[test]
fn every_kernel_file_compiles_without_spills() {
    if !nvrtc_present() {
        return;
    }
    let mut spills = vec![];
    for (file, _) in compile::SOURCES {
        for arch in ["sm_90a", "sm_80"] {
            let (image, log) =
                compile::compile(file, arch, &["--ptxas-options=-v"], false).unwrap_or_else(|e| panic!("{e:#}"));
            assert!(!image.is_empty(), "{file}: empty cubin");
            if arch == "sm_90a" {
                println!("== {file} ({arch})\n{log}");
                // FUSEBOX_CUBIN_DIR=DIR keeps each file's image, to read its SASS
                // without a GPU (`nvdisasm -c DIR/gemv.cubin`, PyPI nvidia-cuda-nvdisasm)
                if let Some(dir) = std::env::var_os("FUSEBOX_CUBIN_DIR") {
                    let p = std::path::Path::new(&dir).join(file.replace(".cu", ".cubin"));
                    std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&p, &image)).unwrap();
                }
            }
            spills.extend(spilling_kernels(&log).into_iter().map(|k| format!("{file} {arch} {k}")));
        }
    }
    assert!(spills.is_empty(), "register spills:\n{}", spills.join("\n"));
}

/// The kernels of a `--ptxas-options=-v` log that spill, with ptxas' line.
fn spilling_kernels(log: &str) -> Vec<String> {
    let mut out = vec![];
    let mut kernel = String::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            kernel = rest.split('\'').next().unwrap_or("").to_string();
        }
        if let Some(n) = line.split("bytes spill stores").next().and_then(|s| s.split(',').next_back()) {
            if line.contains("bytes spill stores") && n.trim().parse::<u32>().unwrap_or(0) > 0 {
                out.push(format!("{kernel}: {}", line.trim()));
            }
        }
    }
    out
}

/// `FUSEBOX_GEMV_PREFETCH=0` compiles the GEMV core with `FB_GEMV_NO_PREFETCH`
/// (wait for the previous kernel before any load): that variant must build too.
#[test]
fn the_gemv_without_prefetch_compiles() {
    if !nvrtc_present() {
        return;
    }
    let (image, log) =
        compile::compile("gemv.cu", "sm_90a", &["-DFB_GEMV_NO_PREFETCH"], false).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(!image.is_empty(), "empty cubin: {log}");
}
