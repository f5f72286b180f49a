//! Generates the C header from the C ABI in `src/` (cbindgen) into
//! `OUT_DIR` only: a build never writes into the source tree.
//!
//! The checked-in copy, `include/kvm_dirty_shim.h`, is compared with it by
//! `tests/header.rs` in every test run. After changing the ABI, refresh the
//! copy with `KDS_BLESS_HEADER=1 cargo test --test header` and commit it.

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
}
