//! With the `header` feature, generates the C header from the C ABI in
//! `src/capi/` (cbindgen) into `OUT_DIR` only: a build never writes into
//! the source tree. Without it (a Rust user's build, and the C library's,
//! `capi`, which ships the checked-in header) it does nothing, and
//! cbindgen is not even compiled.
//!
//! cbindgen emits the functions in source order, one file of `src/ffi/`
//! per API area; this script puts a banner before each area's first
//! function (GROUPS), so that the header reads by task.
//!
//! The checked-in copy, `include/kvm_dirty_shim.h`, is compared with it by
//! `tests/header.rs` in every test run. After changing the ABI, refresh the
//! copy with `KDS_BLESS_HEADER=1 cargo test --features header --test header` and commit it.

/// (first declaration of the group, its banner text).
#[cfg(feature = "header")]
const GROUPS: &[(&str, &str)] = &[
    ("#define KDS_ABI_VERSION", "Constants and types"),
    ("kds_abi_version", "Version and errors"),
    (
        "kds_vm_create",
        "Lifecycle. The call order (doc/abi.md, \"Call order\"):\n\
         kds_vm_create or kds_vm_adopt      accelerator init\n\
         kds_dirty_ring_enable (optional)   before any vCPU and memslot\n\
         kds_board_init                     board chose its interrupt controller\n\
         kds_memslot_update ...             board builds its memory map\n\
         kds_vcpu_add ...                   one per vCPU fd\n\
         \x20  run: kds_reap, kds_vcpu_reap, kds_memslot_sync, kds_flush\n\
         kds_vm_free",
    ),
    (
        "kds_dirty_ring_enable",
        "Setup: the dirty ring and the board-init ordering hook, before the first memslot",
    ),
    ("kds_memslot_update", "Memslots"),
    ("kds_vcpu_add", "vCPUs"),
    ("kds_reap", "Reaping the dirty rings"),
    (
        "kds_memslot_sync",
        "Syncing dirty pages into the caller's bitmaps",
    ),
    ("kds_reaper_enable", "The adaptive reaper thread"),
    ("kds_stats_get", "Statistics"),
    ("kds_logger_set", "Logging"),
    (
        "kds_manual_protect_set",
        "ABI 1 names, kept for callers built against ABI 1 (see doc/abi.md,\n\
         \"ABI history\"); new code uses the names above",
    ),
];

#[cfg(feature = "header")]
fn banner(text: &str) -> String {
    let mut b = String::from(
        "/* ------------------------------------------------------------------------\n",
    );
    for line in text.lines() {
        b.push_str(&format!(" * {line}\n").replace(" * \n", " *\n"));
    }
    b.push_str(" * --------------------------------------------------------------------- */\n\n");
    b
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "header")]
    header();
}

#[cfg(feature = "header")]
fn header() {
    use std::path::PathBuf;
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let header = cbindgen::Builder::new()
        .with_crate(&dir)
        .with_config(config)
        .generate()
        .expect("cbindgen could not generate the header");
    let mut buf = Vec::new();
    header.write(&mut buf);
    let mut h = String::from_utf8(buf).expect("UTF-8 header");
    for (first, text) in GROUPS {
        // The declaration: a line starting with `first`, or a function
        // declaration (after `extern "C" {`) naming `first(`.
        let fns = h.find("extern \"C\" {").expect("extern \"C\" block");
        let decl = if first.starts_with('#') {
            h.find(&format!("\n{first} "))
        } else {
            h[fns..].find(&format!(" {first}(")).map(|i| fns + i)
        }
        .unwrap_or_else(|| panic!("build.rs GROUPS: {first} is not in the header"));
        // Its doc comment's first line, else the declaration's line.
        let line = h[..decl].rfind('\n').map_or(0, |i| i + 1);
        let at = match h[..line].rfind("\n/**\n") {
            Some(i) if !h[i..line].contains("*/\n\n") => i + 1,
            _ => line,
        };
        h.insert_str(at, &banner(text));
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("kvm_dirty_shim.h");
    std::fs::write(out, h).expect("write the header");
}
