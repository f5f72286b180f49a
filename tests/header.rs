//! The checked-in `include/kvm_dirty_shim.h` must be what cbindgen makes
//! of the code now. build.rs writes the generated header to `OUT_DIR`
//! only; this test compares the two in every test run, and
//! `KDS_BLESS_HEADER=1 cargo test --features header --test header` copies the generated one
//! over the checked-in one (the explicit regeneration command).

#[test]
fn checked_in_header_matches_the_code() {
    let generated = include_str!(concat!(env!("OUT_DIR"), "/kvm_dirty_shim.h"));
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/include/kvm_dirty_shim.h");
    if std::env::var_os("KDS_BLESS_HEADER").is_some() {
        std::fs::write(path, generated).expect("write include/kvm_dirty_shim.h");
        eprintln!("wrote {path}");
    }
    let checked_in = std::fs::read_to_string(path).expect("include/kvm_dirty_shim.h");
    assert!(
        generated == checked_in,
        "include/kvm_dirty_shim.h is stale: run `KDS_BLESS_HEADER=1 cargo test --features header --test header` \
         and commit the header"
    );
    for needed in [
        "#ifndef KVM_DIRTY_SHIM_H",
        "extern \"C\" {",
        "#define KDS_ABI_VERSION 3",
        "typedef struct KdsVm KdsVm;",
        "int64_t kds_memslot_sync(",
    ] {
        assert!(generated.contains(needed), "header lacks {needed:?}");
    }
}

#[test]
fn guest_bin_matches_its_source() {
    // Rebuild guest/guest.bin from guest/guest.S where binutils exist.
    let dir = env!("CARGO_MANIFEST_DIR");
    let tmp = std::env::temp_dir().join(format!("kds-guest-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let obj = tmp.join("guest.o");
    let bin = tmp.join("guest.bin");
    let as_ok = std::process::Command::new("as")
        .args(["--32", &format!("{dir}/guest/guest.S"), "-o"])
        .arg(&obj)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !as_ok {
        eprintln!("binutils (as --32) not available: guest.bin not rebuilt");
        return;
    }
    let ok = std::process::Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&obj)
        .arg(&bin)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let rebuilt = std::fs::read(&bin).unwrap();
    let checked_in = std::fs::read(format!("{dir}/guest/guest.bin")).unwrap();
    std::fs::remove_dir_all(&tmp).ok();
    assert_eq!(
        rebuilt, checked_in,
        "guest/guest.bin is stale: rebuild it from guest.S"
    );
}
