//! How tests (and tools) find the committed fixtures and the fetched assets.
//!
//! Test binaries are sometimes run from a different checkout path than the
//! one they were built in (for example on the GPU machine), so fixtures are
//! never found through a path baked in at compile time alone:
//!
//! 1. `FUSEBOX_FIXTURES`, if set, is the fixtures directory;
//! 2. otherwise the first `tests/fixtures` found walking up from the current
//!    directory;
//! 3. otherwise the one beside the source tree the binary was built from.

use std::path::{Path, PathBuf};

/// The `tests/fixtures` directory (see the module docs for the search order).
pub fn fixtures_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("FUSEBOX_FIXTURES") {
        return PathBuf::from(p);
    }
    if let Ok(cwd) = std::env::current_dir() {
        for dir in cwd.ancestors() {
            let cand = dir.join("tests").join("fixtures");
            if cand.is_dir() {
                return cand;
            }
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A path inside the fixtures directory.
pub fn fixture(rel: &str) -> PathBuf {
    fixtures_dir().join(rel)
}

/// Where `scripts/fetch-assets.sh` puts real assets:
/// `$FUSEBOX_ASSETS`, else `~/.cache/fusebox/assets`.
pub fn assets_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("FUSEBOX_ASSETS") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("fusebox").join("assets")
}

/// A fetched asset, or `None` after printing why the caller should skip.
pub fn asset_or_skip(rel: &str, test: &str) -> Option<PathBuf> {
    let p = assets_dir().join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIP {test}: asset {} not present (run scripts/fetch-assets.sh)", p.display());
        None
    }
}
