//! The fusion policy: defaults, overrides (env beats tuned file beats the
//! table; mlxcel's names as aliases), bad values, and the documentation table
//! in docs/environment-variables.md, which must say what the code's table says.

use fusebox_core::cpu::CpuBackend;
use fusebox_core::fixtures::fixtures_dir;
use fusebox_core::fusion::{BackendKind, FusionPolicy, Site, Source, SITES, TABLE};
use fusebox_core::{Backend, DType, Tensor};

fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
}

#[test]
fn defaults_come_from_the_table_and_env_overrides_them() {
    for backend in [BackendKind::Cpu, BackendKind::Cuda] {
        let p = FusionPolicy::resolve_with(backend, "no-such-device-for-tests", env(&[])).unwrap();
        for site in SITES {
            let rule = TABLE.iter().find(|r| r.backend == backend && r.site == site).unwrap();
            assert_eq!(p.is_on(site), rule.on, "{} {}", backend.name(), site.name());
            assert_eq!(p.decision(site).source, Source::Default);
        }
    }
    let p = FusionPolicy::resolve_with(
        BackendKind::Cuda,
        "x",
        env(&[("FUSEBOX_FUSED_ADD_RMS_NORM", "1"), ("MLXCEL_FUSED_QK_NORM", "1"), ("FUSEBOX_FUSED_MOE", "0")]),
    )
    .unwrap();
    assert!(p.is_on(Site::AddRmsNorm) && p.is_on(Site::QkNorm) && !p.is_on(Site::Moe));
    assert_eq!(p.decision(Site::QkNorm).source, Source::Env("MLXCEL_FUSED_QK_NORM".into()));
    // FUSEBOX_ beats the mlxcel alias
    let p = FusionPolicy::resolve_with(
        BackendKind::Cuda,
        "x",
        env(&[("FUSEBOX_FUSED_MOE", "0"), ("MLXCEL_FUSED_MOE", "1")]),
    )
    .unwrap();
    assert!(!p.is_on(Site::Moe));
    let e = FusionPolicy::resolve_with(BackendKind::Cpu, "x", env(&[("FUSEBOX_FUSED_MOE", "yes")])).unwrap_err();
    assert!(format!("{e}").contains("FUSEBOX_FUSED_MOE=yes"), "{e}");
}

#[test]
fn docs_table_matches_the_code() {
    let doc = std::fs::read_to_string(fixtures_dir().join("../../docs/environment-variables.md")).unwrap();
    for site in SITES {
        let var = site.env_var();
        let line = doc
            .lines()
            .find(|l| l.starts_with(&format!("| `{var}`")))
            .unwrap_or_else(|| panic!("docs/environment-variables.md has no row for {var}"));
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | var | cpu default | cuda default | aliases | reason |
        for (i, backend) in [(2, BackendKind::Cpu), (3, BackendKind::Cuda)] {
            let rule = TABLE.iter().find(|r| r.backend == backend && r.site == site).unwrap();
            let want = if rule.on { "1" } else { "0" };
            assert_eq!(cells[i], format!("`{want}`"), "{var}: {} default in the docs", backend.name());
        }
        for alias in site.aliases() {
            assert!(cells[4].contains(alias), "{var}: alias {alias} missing from the docs");
        }
    }
}

#[test]
fn fused_add_rms_norm_equals_the_graph_path_on_the_cpu() {
    let be = CpuBackend::new(2).unwrap();
    for (rows, n) in [(1, 64), (3, 1000), (40, 1024)] {
        let x: Vec<f32> = (0..rows * n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let y: Vec<f32> = (0..rows * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 23.0).collect();
        let w: Vec<f32> = (0..n).map(|i| 0.5 + (i % 7) as f32 / 7.0).collect();
        let (mut xa, mut xb) = (Tensor::from_f32(&[rows, n], &x).unwrap(), Tensor::from_f32(&[rows, n], &x).unwrap());
        let yt = Tensor::from_f32(&[rows, n], &y).unwrap();
        let wt = Tensor::from_f32(&[n], &w).unwrap();
        let (mut ha, mut hb) = (Tensor::zeros(&[rows, n], DType::F32), Tensor::zeros(&[rows, n], DType::F32));
        be.add_rms_norm(&mut xa, &yt, &wt, 1e-6, &mut ha).unwrap();
        be.add_assign(&mut xb, &yt).unwrap();
        be.rms_norm(&xb, &wt, 1e-6, &mut hb).unwrap();
        assert_eq!(xa.as_f32().unwrap(), xb.as_f32().unwrap());
        assert_eq!(ha.as_f32().unwrap(), hb.as_f32().unwrap(), "{rows}x{n}");
    }
}
