//! Every kernel file compiles with NVRTC for sm_90a and sm_80, in both element types, with no
//! warnings and no wgmma serialized by ptxas (its C75xx notes: a non-wgmma instruction touching
//! an in-flight wgmma's registers makes it wait after every wgmma, silently). Needs only
//! libnvrtc (no GPU): CI installs the `nvidia-cuda-nvrtc` 13.0 wheel and sets
//! FDMOE_REQUIRE_NVRTC=1, so a missing NVRTC fails there instead of skipping.
#![cfg(feature = "cuda")]

use fdmoe::backend::cuda::compile::{compile, nvrtc_version, Element, ALL_FILES};

#[test]
fn every_kernel_compiles_for_sm90a_and_sm80() {
    if let Err(e) = nvrtc_version() {
        assert!(
            std::env::var_os("FDMOE_REQUIRE_NVRTC").is_none(),
            "NVRTC required but missing: {e}"
        );
        eprintln!("skipping: {e}");
        return;
    }
    let cache = std::env::temp_dir().join(format!("fdmoe-compile-test-{}", std::process::id()));
    std::env::set_var("FDMOE_CACHE_DIR", &cache);
    for file in ALL_FILES {
        for arch in ["sm_90a", "sm_80"] {
            for element in [Element::Bf16, Element::F16] {
                let cubin =
                    compile(file, arch, element).unwrap_or_else(|e| panic!("{}: {e}", file.name));
                assert!(cubin.image.len() > 1000, "{} {arch}: tiny cubin", file.name);
                assert!(
                    !cubin.log.to_lowercase().contains("warning"),
                    "{} {arch} {element:?} compiled with warnings:\n{}",
                    file.name,
                    cubin.log
                );
                assert!(
                    !cubin.log.contains("(C75"),
                    "{} {arch} {element:?}: ptxas serialized wgmma:\n{}",
                    file.name,
                    cubin.log
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(cache);
}
