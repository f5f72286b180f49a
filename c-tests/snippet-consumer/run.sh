#!/bin/sh
# Stages a QEMU-like tree in a temporary directory (the repo linked in as
# contrib/kvm-dirty-shim, as a QEMU tree would carry it), then:
# 1. configures with the feature enabled, builds, runs the consumer;
# 2. with cargo out of PATH (feature auto): must still configure, and build
#    and run the consumer without the library;
# 3. with a rustc older than the crate's rust-version first in PATH: the
#    feature enabled fails to configure, naming both versions; auto
#    configures without the library.
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
echo "snippet consumer: ok (with cargo: built and linked through meson-snippet; without: configures, builds and runs without the library; an old rustc: refused at configure time)"
