#!/usr/bin/env bash
# Builds the berth:local image from this checkout's binaries: no base image
# and no registry. The binaries come from target/release (built here if
# missing; BERTH_BIN_DIR=target/debug uses a debug build), with the shared
# libraries they load and a static busybox (Debian's busybox-static,
# installed when missing) for the entrypoint script.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${BERTH_BIN_DIR:-target/release}
bins=(berth berth-control berth-agent berth-gateway)
if [[ ! -x "$bin/berth-control" ]]; then
    cargo build --release --bins
fi
if ! command -v busybox >/dev/null; then
    echo "installing busybox-static (the image's shell)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q busybox-static >/dev/null
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root=$ctx/rootfs
mkdir -p "$root/usr/local/bin" "$root/bin" "$root/tmp" "$root/data" "$root/etc"
chmod 1777 "$root/tmp"
for b in "${bins[@]}"; do
    cp "$bin/$b" "$root/usr/local/bin/"
    # The dynamic loader and every library it resolves, at the same paths.
    ldd "$bin/$b" | grep -o '/[^ ]*' | while read -r lib; do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
done
cp deploy/compose/entrypoint.sh "$root/usr/local/bin/"
cp "$(command -v busybox)" "$root/bin/busybox"
for applet in sh cat sleep mv; do ln -s busybox "$root/bin/$applet"; done
echo "root:x:0:0:root:/:/bin/sh" >"$root/etc/passwd"
cp deploy/compose/Dockerfile "$ctx/"
docker build -q -t berth:local "$ctx"
echo "built berth:local from $bin ($(du -sh "$root" | cut -f1))"
