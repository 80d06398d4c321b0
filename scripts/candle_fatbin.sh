#!/usr/bin/env bash
# Prepare candle-core and candle-kernels with scripts/candle-fatbin.patch for the CUDA wheel
# (issue #18: no JIT in a new process). Upstream candle ships its CUDA kernels as PTX text, which
# the driver compiles for the GPU in every process that starts without a warm driver cache
# (13 s of a cold first token on an H200). The patch makes candle-kernels' build also compile each
# kernel module into a fatbin (machine code for CANDLE_KERNELS_FATBIN_ARCHS, PTX for the newest)
# and candle-core load that image when present; without the variable both behave as upstream.
#
#   scripts/candle_fatbin.sh DIR    copies the two crates from cargo's registry into DIR (after
#                                   `cargo fetch`), applies the patch, and prints the cargo
#                                   `--config` arguments that point this build at them.
# The crate as published (and every CPU build) depends on upstream candle unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="$1"
lock_version() { awk -v n="name = \"$1\"" '$0 == n { getline; gsub(/"/, "", $3); print $3 }' Cargo.lock; }
version=$(lock_version candle-core)
[ "$version" = "$(lock_version candle-kernels)" ] || { echo "error: candle-core and candle-kernels differ in Cargo.lock" >&2; exit 1; }
[ "$version" = 0.11.1 ] || { echo "error: scripts/candle-fatbin.patch is for candle 0.11.1, Cargo.lock has $version" >&2; exit 1; }
registry="${CARGO_HOME:-$HOME/.cargo}/registry/src"
print_config() {
    for crate in candle-core candle-kernels; do
        printf -- '--config\npatch.crates-io.%s.path="%s"\n' "$crate" "$dir/$crate-$version"
    done
}
# prepared before from the same patch: leave the files (and cargo's fingerprints of them) alone
if cmp -s scripts/candle-fatbin.patch "$dir/applied.patch"; then print_config; exit 0; fi
rm -rf "$dir" && mkdir -p "$dir"
for crate in candle-core candle-kernels; do
    src=$(ls -d "$registry"/*/"$crate-$version" 2>/dev/null | head -1 || true)
    if [ -n "$src" ]; then
        cp -r "$src" "$dir/"
    else   # downloaded by `cargo fetch` but not unpacked yet
        archive=$(ls "$registry"/../cache/*/"$crate-$version.crate" 2>/dev/null | head -1 || true)
        [ -n "$archive" ] || { echo "error: $crate-$version is not in cargo's registry (run cargo fetch)" >&2; exit 1; }
        tar -xzf "$archive" -C "$dir"
    fi
done
patch -s -d "$dir" -p1 < scripts/candle-fatbin.patch >&2
cp scripts/candle-fatbin.patch "$dir/applied.patch"
print_config
