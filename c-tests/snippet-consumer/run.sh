#!/bin/sh
# Stages a QEMU-like tree in a temporary directory (the repo linked in as
# contrib/kvm-dirty-shim, as a QEMU tree would carry it), then:
# 1. configures with the feature enabled, builds, runs the consumer;
# 2. with cargo out of PATH (feature auto): must still configure, and build
#    and run the consumer without the library;
# 3. with a rustc older than the crate's rust-version first in PATH: the
#    feature enabled fails to configure, naming both versions; auto
#    configures without the library;
# 4. the repository as a meson subproject (subprojects/kvm-dirty-shim), as
#    QEMU's series finds it where pkg-config does not: dependency() with a
#    version and the fallback builds and links it; a version above the
#    crate's is refused.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
meson=$(command -v meson)
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
cp "$here/meson.build" "$here/meson_options.txt" "$here/consumer.c" "$tree/"
mkdir "$tree/contrib"
ln -s "$repo" "$tree/contrib/kvm-dirty-shim"

"$meson" setup "$tree/build" "$tree" -Dkvm_dirty_shim=enabled >/dev/null
"$meson" compile -C "$tree/build" >/dev/null
"$meson" test -C "$tree/build" --print-errorlogs
grep -q "with kvm-dirty-shim: ring enable 0" "$tree/build/meson-logs/testlog.txt" ||
    { echo "the consumer did not run with the library" >&2; exit 1; }

# Without cargo on PATH the tree still configures (feature auto). PATH is
# /usr/bin and /bin minus cargo and rustc (a machine may have Debian's cargo
# in /usr/bin too), plus ninja.
nocargo="$tree/bin"
mkdir "$nocargo"
for f in /bin/* /usr/bin/*; do
    case ${f##*/} in cargo*|rustc*|rustup*) continue ;; esac
    ln -sf "$f" "$nocargo/${f##*/}"
done
ln -sf "$(command -v ninja)" "$nocargo/ninja"
env PATH="$nocargo" "$meson" setup "$tree/nocargo" "$tree" > "$tree/nocargo.log"
grep -q "kvm-dirty-shim *: false" "$tree/nocargo.log" || {
    cat "$tree/nocargo.log"; echo "expected kvm-dirty-shim: false without cargo" >&2; exit 1; }
env PATH="$nocargo" "$meson" test -C "$tree/nocargo" --print-errorlogs >/dev/null
grep -q "without kvm-dirty-shim" "$tree/nocargo/meson-logs/testlog.txt" ||
    { echo "the consumer did not build without the library" >&2; exit 1; }
# A rustc older than Cargo.toml's rust-version.
old="$tree/oldrustc"
mkdir "$old"
printf '#!/bin/sh\necho "rustc 1.70.0 (90c541806 2023-05-31)"\n' > "$old/rustc"
chmod +x "$old/rustc"
if env PATH="$old:$PATH" "$meson" setup "$tree/old" "$tree" -Dkvm_dirty_shim=enabled \
        > "$tree/old.log" 2>&1; then
    echo "configured with rustc 1.70 and the feature enabled" >&2; exit 1
fi
msrv=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' "$repo/Cargo.toml")
grep -q "needs rustc $msrv or later; .* is 1.70.0" "$tree/old.log" ||
    { cat "$tree/old.log"; echo "no message naming rustc $msrv and 1.70.0" >&2; exit 1; }
env PATH="$old:$PATH" "$meson" setup "$tree/old-auto" "$tree" > "$tree/old-auto.log" 2>&1
grep -q "kvm-dirty-shim *: false" "$tree/old-auto.log" ||
    { cat "$tree/old-auto.log"; echo "expected kvm-dirty-shim: false with rustc 1.70" >&2; exit 1; }

# The repository as a subproject, found through dependency()'s fallback.
sub="$tree/sub"
mkdir -p "$sub/subprojects"
ln -s "$repo" "$sub/subprojects/kvm-dirty-shim"
cp "$here/consumer.c" "$here/meson_options.txt" "$sub/"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n 1)
write_sub() { # $1: the version dependency() asks for
    cat > "$sub/meson.build" <<MESON
project('qemu-like-sub', 'c', default_options: ['c_std=gnu11', 'warning_level=2', 'werror=true'])
kvm_dirty_shim = dependency('kvm_dirty_shim', version: '$1', method: 'pkg-config',
                            required: get_option('kvm_dirty_shim'),
                            fallback: ['kvm-dirty-shim', 'kvm_dirty_shim_dep'])
config_host_data = configuration_data()
config_host_data.set('CONFIG_KVM_DIRTY_SHIM', kvm_dirty_shim.found())
configure_file(output: 'config-host.h', configuration: config_host_data)
test('consumer', executable('consumer', 'consumer.c', dependencies: kvm_dirty_shim))
MESON
}
write_sub ">=$version"
env PKG_CONFIG_PATH= "$meson" setup "$sub/build" "$sub" -Dkvm_dirty_shim=enabled > "$sub/setup.log"
grep -q "Dependency kvm_dirty_shim .*from subproject subprojects/kvm-dirty-shim found: YES $version" \
    "$sub/setup.log" || { cat "$sub/setup.log"; echo "the subproject was not used" >&2; exit 1; }
"$meson" test -C "$sub/build" --print-errorlogs >/dev/null
grep -q "with kvm-dirty-shim: ring enable 0" "$sub/build/meson-logs/testlog.txt" ||
    { echo "the consumer did not run with the subproject's library" >&2; exit 1; }
write_sub ">=99.0"
if env PKG_CONFIG_PATH= "$meson" setup "$sub/new" "$sub" -Dkvm_dirty_shim=enabled \
        > "$sub/new.log" 2>&1; then
    echo "configured against kvm-dirty-shim $version where >=99.0 was asked for" >&2; exit 1
fi
echo "snippet consumer: ok (with cargo: built and linked through meson-snippet; without: configures, builds and runs without the library; an old rustc: refused at configure time; as a subproject: found by dependency() with its version $version, and refused for >=99.0)"
