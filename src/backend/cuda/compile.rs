//! Kernel build: the `kernels/*.cu` sources are embedded in the library, expanded (our own
//! `#include "common/..."` lines are inlined, so NVRTC needs no include paths), compiled by
//! NVRTC to a cubin for one architecture (sm_90a on Hopper, sm_80 on Ampere) and cached on disk.
//! The cache key hashes the expanded source, the options and the NVRTC version, so a change in
//! any of them compiles afresh; files are written to a temporary name and renamed (atomic).
//! Only `create_backend` compiles; forward never does.

use std::ffi::{c_char, c_int, CStr, CString};
use std::path::PathBuf;

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
use once_cell::sync::OnceCell;

use crate::error::{Error, FdmoeStatus, Result};

/// One compilation unit: a file of `kernels/` and its entry points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelFile {
    pub name: &'static str,
    source: &'static str,
}

macro_rules! kernel_file {
    ($name:literal) => {
        KernelFile {
            name: $name,
            source: include_str!(concat!("../../../kernels/", $name)),
        }
    };
}

pub const GATE_LOGITS: KernelFile = kernel_file!("gate_logits.cu");
pub const ROUTE_TOPK: KernelFile = kernel_file!("route_topk.cu");
pub const SORT_BY_EXPERT: KernelFile = kernel_file!("sort_by_expert.cu");
pub const GROUPED_GEMM: KernelFile = kernel_file!("grouped_gemm.cu");
pub const GROUPED_GEMM_QUANT: KernelFile = kernel_file!("grouped_gemm_quant.cu");
pub const COMBINE: KernelFile = kernel_file!("combine.cu");
pub const PRE_DISPATCH_FP8: KernelFile = kernel_file!("pre_dispatch_fp8.cu");

/// Every kernel file, for the compile-everything test.
pub const ALL_FILES: [KernelFile; 7] = [
    GATE_LOGITS,
    ROUTE_TOPK,
    SORT_BY_EXPERT,
    GROUPED_GEMM,
    GROUPED_GEMM_QUANT,
    COMBINE,
    PRE_DISPATCH_FP8,
];

const HEADERS: [(&str, &str); 17] = [
    (
        "common/gemm_tile.cuh",
        include_str!("../../../kernels/common/gemm_tile.cuh"),
    ),
    (
        "common/fp8.cuh",
        include_str!("../../../kernels/common/fp8.cuh"),
    ),
    (
        "common/types.cuh",
        include_str!("../../../kernels/common/types.cuh"),
    ),
    (
        "common/activation.cuh",
        include_str!("../../../kernels/common/activation.cuh"),
    ),
    (
        "common/mma.cuh",
        include_str!("../../../kernels/common/mma.cuh"),
    ),
    (
        "common/wgmma.cuh",
        include_str!("../../../kernels/common/wgmma.cuh"),
    ),
    (
        "common/routing.cuh",
        include_str!("../../../kernels/common/routing.cuh"),
    ),
    (
        "common/sort.cuh",
        include_str!("../../../kernels/common/sort.cuh"),
    ),
    (
        "common/block_arrive.cuh",
        include_str!("../../../kernels/common/block_arrive.cuh"),
    ),
    (
        "quant/fp8_act_groups.cuh",
        include_str!("../../../kernels/quant/fp8_act_groups.cuh"),
    ),
    (
        "quant/gemm_fp8_mma.cuh",
        include_str!("../../../kernels/quant/gemm_fp8_mma.cuh"),
    ),
    (
        "quant/fp4_decode.cuh",
        include_str!("../../../kernels/quant/fp4_decode.cuh"),
    ),
    (
        "quant/gemm_fp4_mma.cuh",
        include_str!("../../../kernels/quant/gemm_fp4_mma.cuh"),
    ),
    (
        "quant/gemm_fp4_wgmma.cuh",
        include_str!("../../../kernels/quant/gemm_fp4_wgmma.cuh"),
    ),
    (
        "quant/wgmma_epilogue.cuh",
        include_str!("../../../kernels/quant/wgmma_epilogue.cuh"),
    ),
    (
        "quant/gemm_w4a8.cuh",
        include_str!("../../../kernels/quant/gemm_w4a8.cuh"),
    ),
    (
        "quant/gemm_w8a8.cuh",
        include_str!("../../../kernels/quant/gemm_w8a8.cuh"),
    ),
];

/// Tests' view of a kernel file or header (`"sort_by_expert.cu"`, `"common/sort.cuh"`): the
/// source the library compiles.
#[cfg(test)]
pub(crate) fn kernel_source(name: &str) -> &'static str {
    ALL_FILES
        .iter()
        .map(|f| (f.name, f.source))
        .chain(HEADERS)
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no kernel source {name}"))
        .1
}

/// Tests' view of a kernel constant: the comma-separated numbers of `#define NAME value` (or
/// `{...}`) in `source`, for checking the host's copies against the kernels'.
#[cfg(test)]
pub(crate) fn define_values(source: &str, name: &str) -> Vec<usize> {
    let prefix = format!("#define {name} ");
    let value = source
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("{name} is not defined"));
    value
        .trim_matches(|c| c == '{' || c == '}')
        .split(',')
        .map(|v| v.trim().parse().expect("a number"))
        .collect()
}

/// Element type a kernel build works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element {
    Bf16,
    F16,
}

/// Inlines our headers (each once, like `#pragma once`).
fn expand(source: &str, seen: &mut Vec<&'static str>, out: &mut String) -> Result<()> {
    for line in source.lines() {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("#include \"") {
            let name = rest.trim_end_matches('"');
            let (hname, htext) = HEADERS
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| Error::internal(format!("kernel includes unknown header {name}")))?;
            if !seen.contains(hname) {
                seen.push(hname);
                expand(htext, seen, out)?;
            }
        } else if trimmed != "#pragma once" {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(())
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("FDMOE_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("fdmoe"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("fdmoe"))
}

/// Makes libnvrtc loadable by name: libnvrtc.so.13 opens libnvrtc-builtins by name, so the
/// builtins are preloaded from the same folder (found on the usual paths, `FDMOE_NVRTC_DIR`,
/// the CUDA toolkit, or the `nvidia-cuda-nvrtc` Python wheel).
fn load_nvrtc() -> Result<()> {
    static LOADED: OnceCell<std::result::Result<(), String>> = OnceCell::new();
    LOADED
        .get_or_init(|| {
            let mut dirs: Vec<PathBuf> = Vec::new();
            if let Some(d) = std::env::var_os("FDMOE_NVRTC_DIR") {
                dirs.push(d.into());
            }
            if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
                dirs.extend(std::env::split_paths(&paths));
            }
            dirs.push("/usr/local/cuda/lib64".into());
            dirs.push("/usr/local/cuda/targets/x86_64-linux/lib".into());
            dirs.extend(python_nvrtc_dirs());
            for dir in dirs {
                let lib = dir.join("libnvrtc.so.13");
                if !lib.exists() {
                    continue;
                }
                if let Ok(entries) = std::fs::read_dir(&dir) {
                    for entry in entries.flatten() {
                        let name = entry.file_name().to_string_lossy().to_string();
                        if name.starts_with("libnvrtc-builtins.so.13") {
                            dlopen_global(&entry.path());
                        }
                    }
                }
                if dlopen_global(&lib) {
                    break;
                }
            }
            // SAFETY: probing for the library by name has no side effect beyond loading it.
            if unsafe { nvrtc_sys::is_culib_present() } {
                Ok(())
            } else {
                Err("the NVRTC library libnvrtc.so.13 was not found (install the CUDA 13 toolkit or `pip install nvidia-cuda-nvrtc==13.0.*`, or set FDMOE_NVRTC_DIR)".to_string())
            }
        })
        .clone()
        .map_err(|m| Error::new(FdmoeStatus::NoDevice, m))
}

fn python_nvrtc_dirs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for base in ["/usr/local/lib", "/usr/lib", "/opt"] {
        let Ok(entries) = std::fs::read_dir(base) else {
            continue;
        };
        for e in entries.flatten() {
            out.push(e.path().join("site-packages/nvidia/cu13/lib"));
            out.push(e.path().join("dist-packages/nvidia/cu13/lib"));
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        let pyenv = PathBuf::from(home).join(".pyenv/versions");
        if let Ok(entries) = std::fs::read_dir(pyenv) {
            for e in entries.flatten() {
                if let Ok(libs) = std::fs::read_dir(e.path().join("lib")) {
                    for l in libs.flatten() {
                        out.push(l.path().join("site-packages/nvidia/cu13/lib"));
                    }
                }
            }
        }
    }
    out
}

fn dlopen_global(path: &std::path::Path) -> bool {
    let Ok(c) = CString::new(path.to_string_lossy().as_bytes()) else {
        return false;
    };
    // SAFETY: dlopen of a shared library; the handle is intentionally kept for the process.
    !unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) }.is_null()
}

fn nvrtc_error(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::new(
        FdmoeStatus::CudaError,
        format!("NVRTC {what} failed: {e:?}"),
    )
}

/// The NVRTC version, (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    load_nvrtc()?;
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: plain out-parameters.
    let status = unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
    if status != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_error("nvrtcVersion", status));
    }
    Ok((major, minor))
}

/// A compiled cubin and NVRTC's log (warnings).
pub struct Cubin {
    pub image: Vec<u8>,
    pub log: String,
}

/// Compiles `file` for `arch` (e.g. "sm_90a", "sm_80") and `element`, through the disk cache.
pub fn compile(file: KernelFile, arch: &str, element: Element) -> Result<Cubin> {
    let mut source = String::new();
    expand(file.source, &mut Vec::new(), &mut source)?;
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--device-as-default-execution-space".to_string(),
        "--extra-device-vectorization".to_string(),
        "-lineinfo".to_string(),
    ];
    if element == Element::F16 {
        options.push("-DFDMOE_F16".to_string());
    }
    if arch == "sm_90a" {
        options.push("-DFDMOE_SM90A".to_string());
    }
    if let Some(define) = gemm_trace_define(file.name) {
        options.push(define);
    }
    let (major, minor) = nvrtc_version()?;
    let key = fnv1a(&[
        source.as_bytes(),
        options.join(" ").as_bytes(),
        format!("{major}.{minor}").as_bytes(),
    ]);
    let stem = file.name.trim_end_matches(".cu");
    let cached = cache_dir().map(|d| d.join(format!("{stem}-{arch}-{key:016x}.cubin")));
    if let Some(path) = &cached {
        if let Ok(image) = std::fs::read(path) {
            if !image.is_empty() {
                return Ok(Cubin {
                    image,
                    log: String::new(),
                });
            }
        }
    }
    let cubin = compile_uncached(file.name, &source, &options)?;
    if let Some(path) = &cached {
        // A cache that cannot be written only costs a recompile next time.
        let _ = write_atomic(path, &cubin.image);
    }
    Ok(cubin)
}

/// Diagnostics only (bench/gemm_trace.py): `FDMOE_GEMM_TRACE=0x<device address>` compiles the
/// decode GEMMs' phase stamps into grouped_gemm_quant.cu, writing to that buffer
/// (kernels/common/types.cuh). Anything but a hex address is ignored.
fn gemm_trace_define(file: &str) -> Option<String> {
    if file != "grouped_gemm_quant.cu" {
        return None;
    }
    let value = std::env::var("FDMOE_GEMM_TRACE").ok()?;
    let digits = value.strip_prefix("0x")?;
    (!digits.is_empty() && digits.len() <= 16 && digits.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| format!("-DFDMOE_GEMM_TRACE={value}ull"))
}

fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("cache files live in a folder");
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().unwrap().to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

fn compile_uncached(name: &str, source: &str, options: &[String]) -> Result<Cubin> {
    let src = CString::new(source).map_err(|_| Error::internal("kernel source contains NUL"))?;
    let cname = CString::new(name).expect("file names have no NUL");
    let program =
        nvrtc::create_program(&src, Some(&cname)).map_err(|e| nvrtc_error("create_program", e))?;
    // SAFETY: `program` is a live NVRTC program until destroyed below.
    let outcome = unsafe { nvrtc::compile_program(program, options) };
    let log = unsafe { nvrtc::get_program_log(program) }
        .map(|l| {
            let bytes: Vec<u8> = l.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        })
        .unwrap_or_default();
    let result = match outcome {
        Err(e) => Err(Error::new(
            FdmoeStatus::CudaError,
            format!(
                "NVRTC could not compile kernels/{name} ({}): {e:?}\n{log}",
                options.join(" ")
            ),
        )),
        Ok(()) => unsafe { cubin_of(program) }.map(|image| Cubin { image, log }),
    };
    // SAFETY: destroyed once, after its last use.
    let _ = unsafe { nvrtc::destroy_program(program) };
    result
}

unsafe fn cubin_of(program: nvrtc_sys::nvrtcProgram) -> Result<Vec<u8>> {
    let mut size = 0usize;
    let status = nvrtc_sys::nvrtcGetCUBINSize(program, &mut size);
    if status != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_error("nvrtcGetCUBINSize", status));
    }
    let mut image = vec![0u8; size];
    let status = nvrtc_sys::nvrtcGetCUBIN(program, image.as_mut_ptr() as *mut c_char);
    if status != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_error("nvrtcGetCUBIN", status));
    }
    Ok(image)
}

/// Reads a NUL-terminated C string into a Rust string (for driver error names).
pub(crate) fn c_str(p: *const c_char) -> String {
    if p.is_null() {
        return String::from("?");
    }
    // SAFETY: the driver returns static NUL-terminated strings.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_expand_once() {
        let mut out = String::new();
        expand(GROUPED_GEMM.source, &mut Vec::new(), &mut out).unwrap();
        assert_eq!(out.matches("typedef unsigned short u16;").count(), 1);
        assert!(!out.contains("#include \"common/"));
    }
}
