//! Writes `include/kvm_dirty_shim.h` from the C ABI in `src/` (cbindgen).
//! The header is checked in; `tests/header.rs` fails when it differs from
//! what the code generates.

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let header = cbindgen::Builder::new()
        .with_crate(&dir)
        .with_config(config)
        .generate()
        .expect("cbindgen could not generate the header");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("kvm_dirty_shim.h");
    header.write_to_file(&out);
    // Keep the checked-in copy in step when the sources change, unless asked
    // not to: the test command sets KDS_HEADER_CHECK=1 so that
    // tests/header.rs compares the committed file instead of rewriting it.
    println!("cargo:rerun-if-env-changed=KDS_HEADER_CHECK");
    if std::env::var_os("KDS_HEADER_CHECK").is_none() {
        header.write_to_file(dir.join("include/kvm_dirty_shim.h"));
    }
}
