#!/usr/bin/env bash
# llama-server.sh: build llama.cpp's `llama-server` once and print its path.
#
#   scripts/llama-server.sh            -> builds if needed, prints the binary path
#   scripts/llama-server.sh --python   -> prints the path of a Python (venv) that
#                                         has `gguf` and `numpy`, for
#                                         scripts/tiny-gguf.py; builds nothing
#
# Only the path goes to stdout (one line); progress and errors go to stderr, so
#   LLAMA_SERVER=$(scripts/llama-server.sh)
#   "$(scripts/llama-server.sh --python)" scripts/tiny-gguf.py /tmp/tiny.gguf
# are safe to use in tests.
#
# Where: ${BERTH_CACHE:-$HOME/.cache/berth}/llama-server-0.3.36/
#   bin/llama-server   the binary (statically linked to ggml/llama; only libc,
#                      libstdc++ and libgomp are loaded at run time)
#   venv/              Python venv with scikit-build-core, gguf and numpy
# It lives outside the clone on purpose: CI's fresh clone of the repo on the
# same machine reuses it. Delete the directory to force a rebuild.
#
# How: llama.cpp has no Debian package and only PyPI is reachable, so the
# source comes from the llama-cpp-python 0.3.36 sdist (pip download; it vendors
# llama.cpp at commit 0c1e570). vendor/llama.cpp is configured with cmake (web
# UI prebuilt download off, CPU-generic code, static libs, no OpenSSL/curl,
# tests/examples off) and only the `llama-server` target is built, with
# BERTH_BUILD_JOBS (default 2) jobs. The build happens in a temporary
# directory inside the cache and the finished binary is renamed into place, so
# an interrupted build never leaves a partial binary. A lock makes concurrent
# callers wait for one build. cmake (and g++/python3-venv, when missing) is
# installed with apt-get (needs root).
#
# Cost: the first run takes about 11 minutes on a 2-core machine (measured
# here: 11 min 9 s in all, including apt-get of cmake and an ~11 s venv,
# while a cargo build shared the cores; the script prints its own "took"
# figure), needs apt and PyPI only then, and leaves ~15 MB of binary plus a
# ~110 MB venv (the build tree is deleted). Later runs print the path at once
# (~10 ms). The binary uses AVX2/FMA/F16C (llama.cpp's default x86 variant
# with GGML_NATIVE=OFF).
#
# Serving the tiny test model (scripts/tiny-gguf.py), pass `-t 1`: with the
# default thread count (OpenMP, spin-waiting) on 2 busy cores one 64-token
# completion once took 14.8 s instead of the usual 6-15 ms. Stopping it:
# SIGTERM exits 0 in a few ms when idle, but with a request in flight this
# llama-server hangs ("cleaning up before exit..." and then nothing) until a
# second signal (then exit 1): send SIGTERM, wait briefly, then SIGKILL.
set -euo pipefail

VERSION=0.3.36
CACHE="${BERTH_CACHE:-$HOME/.cache/berth}/llama-server-$VERSION"
BIN="$CACHE/bin/llama-server"
VENV="$CACHE/venv"
VENV_PY="$VENV/bin/python"
VENV_READY="$VENV/.berth-ready"
JOBS="${BERTH_BUILD_JOBS:-2}"
# Packages the venv gets; bump the marker suffix when this list changes.
VENV_PKGS=(scikit-build-core gguf numpy)
VENV_STAMP="v1"

log() { printf 'llama-server.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

mode=binary
case "${1:-}" in
"") ;;
--python) mode=python ;;
-h | --help)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 0
    ;;
*) die "unknown argument '$1' (use no argument, --python or --help)" ;;
esac

# Fast paths: nothing to build.
if [[ $mode == binary && -x $BIN ]]; then
    printf '%s\n' "$BIN"
    exit 0
fi
if [[ $mode == python && -f $VENV_READY && $(cat "$VENV_READY") == "$VENV_STAMP" && -x $VENV_PY ]]; then
    printf '%s\n' "$VENV_PY"
    exit 0
fi

mkdir -p "$CACHE" || die "cannot create cache directory $CACHE"
# One builder at a time; the others wait here and then take the fast path.
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
    log "another llama-server.sh holds $CACHE/.lock; waiting for it"
    flock 9
fi

apt_install() {
    # apt_install PKG...: install Debian packages (root only).
    if [[ $(id -u) != 0 ]]; then
        die "missing $*: install with 'apt-get install $*' (needs root)"
    fi
    command -v apt-get >/dev/null || die "missing $* and no apt-get to install it"
    log "installing Debian packages: $*"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "$@" >&2; then
        apt-get update >&2 || die "apt-get update failed"
        apt-get install -y --no-install-recommends "$@" >&2 || die "apt-get install $* failed"
    fi
}

ensure_venv() {
    if [[ -f $VENV_READY && $(cat "$VENV_READY") == "$VENV_STAMP" && -x $VENV_PY ]]; then
        return
    fi
    local python="${PYTHON:-python3}"
    command -v "$python" >/dev/null || die "no $python found (set PYTHON=/path/to/python3)"
    log "creating venv $VENV with: ${VENV_PKGS[*]}"
    rm -rf "$VENV"
    if ! "$python" -m venv "$VENV" >&2; then
        rm -rf "$VENV"
        # Debian's python3 needs python3-venv for ensurepip.
        apt_install python3-venv
        "$python" -m venv "$VENV" >&2 || die "'$python -m venv $VENV' failed"
    fi
    "$VENV_PY" -m pip install --quiet --disable-pip-version-check "${VENV_PKGS[@]}" >&2 ||
        die "pip install ${VENV_PKGS[*]} into $VENV failed (is PyPI reachable?)"
    printf '%s\n' "$VENV_STAMP" >"$VENV_READY"
}

start=$SECONDS
ensure_venv
if [[ $mode == python ]]; then
    printf '%s\n' "$VENV_PY"
    exit 0
fi
# Another caller may have finished the build while we waited for the lock.
if [[ -x $BIN ]]; then
    printf '%s\n' "$BIN"
    exit 0
fi

command -v cmake >/dev/null || apt_install cmake
command -v c++ >/dev/null || command -v g++ >/dev/null || apt_install g++ make
command -v make >/dev/null || apt_install make

WORK="$(mktemp -d "$CACHE/build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
log "building llama-server (llama-cpp-python $VERSION) in $WORK with -j$JOBS; this takes ~11 minutes on 2 cores"

log "downloading the llama-cpp-python $VERSION sdist from PyPI"
(cd "$WORK" && "$VENV_PY" -m pip download --quiet --disable-pip-version-check --no-deps \
    --no-build-isolation --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK/dl" >&2) ||
    die "pip download llama-cpp-python==$VERSION failed"
sdist="$(ls "$WORK"/dl/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null | head -n1 || true)"
[[ -n $sdist ]] || die "pip download produced no llama_cpp_python-$VERSION.tar.gz in $WORK/dl"
tar -xzf "$sdist" -C "$WORK" || die "cannot unpack $sdist"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
[[ -f $SRC/CMakeLists.txt ]] || die "no vendor/llama.cpp/CMakeLists.txt in $sdist"

log "configuring $SRC"
cmake -S "$SRC" -B "$WORK/build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DGGML_NATIVE=OFF \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_CURL=OFF >&2 || die "cmake configure failed (see above)"

log "compiling (cmake --build --target llama-server -j$JOBS)"
cmake --build "$WORK/build" --target llama-server -j"$JOBS" >&2 ||
    die "cmake build of llama-server failed (see above)"
built="$WORK/build/bin/llama-server"
[[ -x $built ]] || die "build finished but $built is missing"
"$built" --version >/dev/null 2>&1 || die "built $built does not run ('--version' failed)"

# Copy next to the destination, then rename: atomic on one filesystem.
mkdir -p "$CACHE/bin"
tmp_bin="$CACHE/bin/.llama-server.tmp.$$"
cp "$built" "$tmp_bin" && chmod 755 "$tmp_bin" && mv -f "$tmp_bin" "$BIN" ||
    {
        rm -f "$tmp_bin"
        die "cannot install the binary to $BIN"
    }
log "built $BIN; took $((SECONDS - start)) s"
printf '%s\n' "$BIN"
