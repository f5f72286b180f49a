# Sourced by build-and-test and build-prefixes: the configure options of
# the x86_64 builds the tests run. Only what the tests need: no default
# features, KVM without TCG, no debug info (a third of the compile time);
# the library found through pkg-config in prefix $1 (meson's
# pkg_config_path option, which it keeps for the regenerations a changed
# meson.build makes ninja run; PKG_CONFIG_PATH would hold for the first
# configure only).
qemu_options() { # $1 the library's prefix
    echo "--target-list=x86_64-softmmu --without-default-features --enable-kvm \
        --disable-tcg --disable-debug-info --disable-docs --disable-werror --disable-install-blobs \
        --firmwarepath=/usr/share/seabios:/usr/share/qemu:/usr/lib/ipxe/qemu \
        -Dpkg_config_path=$1/lib/pkgconfig"
}
