//! Builds every header-driven C test in `tests/c/` with the system C compiler against the
//! cdylib this `cargo test` run built, runs it, and fails on a non-zero exit.
//!
//! The programs include only `include/fdmoe.h` (plus libc/libm/pthreads), so they check the
//! C ABI exactly as a C caller sees it. `cargo test` (and `cargo test --release`) builds every
//! crate type of the library before it runs the integration tests, the cdylib included, into
//! `target/<profile>/deps/libfdmoe.so`, next to this test's own executable
//! (`target/<profile>/deps/c_api-*`); that is the library tested. (Only `cargo build` copies
//! it up to `target/<profile>/libfdmoe.so`, which may therefore be older; it is used only when
//! `deps/` has none.) Set `FDMOE_LIB_DIR` to test another build.
//!
//! Each program prints a final line `N passed, M failed`; run one by hand with
//! `cc -std=c11 -Iinclude tests/c/test_api.c -Ltarget/debug -lfdmoe -lm -pthread
//! -Wl,-rpath,$PWD/target/debug -o /tmp/test_api && /tmp/test_api`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The folder holding the `libfdmoe.so` under test: `FDMOE_LIB_DIR`, else the one this
/// `cargo test` built in `target/<profile>/deps/`, else `target/<profile>/`.
fn library_dir() -> PathBuf {
    let candidates: Vec<PathBuf> = match std::env::var_os("FDMOE_LIB_DIR") {
        Some(dir) => vec![PathBuf::from(dir)],
        None => {
            let exe = std::env::current_exe().expect("path of the test executable");
            let deps = exe.parent().expect("target/<profile>/deps").to_path_buf();
            let profile = deps.parent().expect("target/<profile>").to_path_buf();
            vec![deps, profile]
        }
    };
    let dir = candidates
        .iter()
        .find(|dir| dir.join("libfdmoe.so").is_file())
        .unwrap_or_else(|| {
            panic!(
                "libfdmoe.so not found in {candidates:?}: `cargo test` builds it (crate-type cdylib) \
                 into target/<profile>/deps; set FDMOE_LIB_DIR to use another build"
            )
        });
    dir.canonicalize().expect("canonical library folder")
}

/// The target triple of this build, for the `cc` crate (which otherwise reads it from the
/// environment of a build script).
fn host_triple() -> String {
    let arch = std::env::consts::ARCH;
    if cfg!(target_os = "macos") {
        format!("{arch}-apple-darwin")
    } else if cfg!(target_env = "musl") {
        format!("{arch}-unknown-linux-musl")
    } else {
        format!("{arch}-unknown-linux-gnu")
    }
}

/// Compiles one C test program and links it against `libdir/libfdmoe.so`.
fn compile(source: &Path, exe: &Path, libdir: &Path, include: &Path) {
    let triple = host_triple();
    let compiler = cc::Build::new()
        .target(&triple)
        .host(&triple)
        .opt_level(1)
        .debug(true)
        .cargo_metadata(false)
        .get_compiler();
    let mut cmd = compiler.to_command();
    cmd.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pthread"])
        .arg("-I")
        .arg(include)
        .arg(source)
        .arg("-o")
        .arg(exe)
        .arg("-L")
        .arg(libdir)
        .args(["-lfdmoe", "-lm"])
        .arg(format!("-Wl,-rpath,{}", libdir.display()));
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "compiling {} failed: {cmd:?}\n{}{}",
        source.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The C test programs: every `tests/c/*.c`, by name, sorted.
fn c_programs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("tests/c exists")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "c"))
        .map(|p| {
            p.file_stem()
                .expect("file name")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// True when `line` is `N passed, 0 failed` with N > 0.
fn all_passed(line: &str) -> bool {
    let Some((passed, failed)) = line.trim().split_once(" passed, ") else {
        return false;
    };
    passed.parse::<u64>().is_ok_and(|n| n > 0) && failed == "0 failed"
}

/// Compiles `tests/c/<name>.c`, runs it, and panics with its output unless it exits 0 with
/// the final line `N passed, 0 failed`.
fn run_c_program(name: &str) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let libdir = library_dir();
    // One folder per process and program: debug and release runs may overlap.
    let build = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("c_api-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&build).expect("create the build folder");
    let exe = build.join(name);
    compile(
        &root.join("tests/c").join(format!("{name}.c")),
        &exe,
        &libdir,
        &root.join("include"),
    );
    let output = Command::new(&exe)
        .current_dir(&build)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or("");
    println!("{name}: {last}");
    assert!(
        output.status.success() && all_passed(last),
        "{name} failed ({}) against {}:\n{stdout}{}",
        output.status,
        libdir.join("libfdmoe.so").display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = std::fs::remove_dir_all(&build);
}

/// The programs run by the tests below; a new `tests/c/*.c` needs a line here.
const PROGRAMS: [&str; 4] = ["test_api", "test_errors", "test_layouts", "test_quantized"];

#[test]
fn every_c_program_is_run() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    assert_eq!(
        c_programs(&root.join("tests/c")),
        PROGRAMS,
        "tests/c/*.c and the tests in tests/c_api.rs differ"
    );
}

#[test]
fn c_test_api() {
    run_c_program("test_api");
}

#[test]
fn c_test_errors() {
    run_c_program("test_errors");
}

#[test]
fn c_test_layouts() {
    run_c_program("test_layouts");
}

#[test]
fn c_test_quantized() {
    run_c_program("test_quantized");
}
