//! The checked-in C header must be exactly what cbindgen generates from the source.
//! `FDMOE_BLESS_HEADER=1 cargo test --test header` rewrites it.

use std::path::PathBuf;

#[test]
fn header_is_up_to_date() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    let generated = cbindgen::Builder::new()
        .with_crate(&root)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header");
    let mut bytes = Vec::new();
    generated.write(&mut bytes);
    let generated = String::from_utf8(bytes).expect("utf-8 header");
    let path = root.join("include/fdmoe.h");
    if std::env::var_os("FDMOE_BLESS_HEADER").is_some() {
        std::fs::write(&path, &generated).expect("write include/fdmoe.h");
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "include/fdmoe.h is stale: run `FDMOE_BLESS_HEADER=1 cargo test --test header` and commit it"
    );
}
