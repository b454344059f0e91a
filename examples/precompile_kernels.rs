//! Fills the kernel cache ahead of time, with no GPU: compiles every kernel file with NVRTC for
//! the given architectures and both element types into `FDMOE_CACHE_DIR` (else the default
//! cache, `~/.cache/fdmoe`). An image built this way creates backends without compiling.
//! The cache key is the source, the options and NVRTC's major.minor, so cubins made by one
//! 13.0 NVRTC are found by a library that loads another 13.0 NVRTC.
//!
//! ```text
//! FDMOE_CACHE_DIR=/opt/fdmoe-cache cargo run --release --example precompile_kernels -- sm_90a [sm_80]
//! ```

#[cfg(feature = "cuda")]
fn main() -> std::process::ExitCode {
    use fdmoe::backend::cuda::compile::{compile, Element, ALL_FILES};

    let archs: Vec<String> = std::env::args().skip(1).collect();
    if archs.is_empty() {
        eprintln!("usage: precompile_kernels ARCH [ARCH ...]   (e.g. sm_90a sm_80)");
        return std::process::ExitCode::from(2);
    }
    for arch in &archs {
        for file in ALL_FILES {
            for element in [Element::Bf16, Element::F16] {
                if let Err(e) = compile(file, arch, element) {
                    eprintln!("{} {arch} {element:?}: {e}", file.name);
                    return std::process::ExitCode::FAILURE;
                }
            }
            println!("{} {arch}: cached", file.name);
        }
    }
    std::process::ExitCode::SUCCESS
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("precompile_kernels needs the cuda feature");
}
