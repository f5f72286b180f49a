#!/bin/sh
# Stages a QEMU-like tree in a temporary directory (the repo linked in as
# contrib/kvm-dirty-shim, as a QEMU tree would carry it), then:
# 1. configures with the feature enabled, builds, runs the consumer;
# 2. configures with cargo out of PATH (feature auto): must still configure.
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
echo "snippet consumer: ok (built and linked through meson-snippet; configures without cargo)"
