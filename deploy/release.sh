#!/usr/bin/env bash
# Builds envrender's release artifacts into dist/ (DIST overrides):
#   envrender-VERSION-ARCH-linux-musl           fully static binaries (musl),
#                                               stripped, for x86_64 and aarch64;
#                                               each carries its dependency list
#                                               (cargo auditable)
#   envrender-VERSION-ARCH-linux-musl.cdx.json  its SBOM (CycloneDX), made
#                                               from that list (auditable2cdx)
#   envrender-VERSION-ARCH-linux-musl.tar.gz    the binary, LICENSE, README.md,
#                                               shell completions, the man page
#   envrender-VERSION-image.oci.tar             the multi-arch image (OCI layout:
#                                               both images and their index),
#                                               also left here as TAG-amd64 and
#                                               TAG-arm64 (deploy/image/build.sh)
#   SHA256SUMS
# On an x86_64 machine the x86_64 binary is built with musl-gcc (Debian's
# musl-tools), any other with cargo-zigbuild (PyPI's ziglang and
# cargo-zigbuild, installed into CARGO_TARGET_DIR/release-tools); these and
# cargo-auditable and auditable2cdx are installed when missing, the PyPI
# and crates.io ones at pinned versions, Debian's as the release has them
# (that needs root).
# Each binary is checked to be static for its architecture and to run (the
# arm64 one under qemu-aarch64-static, when present). Paths of this machine
# are remapped out of the binaries, and archives and images carry the
# commit's time, so the same commit and tools build the same files.
# CARGO_TARGET_DIR, DIST, RUSTFLAGS and PODMAN (see deploy/image/build.sh)
# are honoured; relative paths are the repository's.
#
#   deploy/release.sh                         # both architectures, both images
#   deploy/release.sh --tag REGISTRY/envrender:0.1.0
#   deploy/release.sh --no-image x86_64       # one binary, no image
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

# Pinned build tools.
ZIGLANG=0.17.1
CARGO_ZIGBUILD=0.24.1
CARGO_AUDITABLE=0.7.7
AUDITABLE2CDX=0.1.0

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
image=1
tag="localhost/envrender:$version"
archs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-image) image=0 ;;
    --tag) tag=$2; shift ;;
    --tag=*) tag=${1#--tag=} ;;
    x86_64 | aarch64) archs+=("$1") ;;
    *)
      echo "usage: deploy/release.sh [--no-image] [--tag TAG] [x86_64] [aarch64]" >&2
      exit 2
      ;;
  esac
  shift
done
[ ${#archs[@]} -gt 0 ] || archs=(x86_64 aarch64)
# Relative paths are the repository's (the script works from its root).
dist=${DIST:-dist}
target_dir=${CARGO_TARGET_DIR:-target}
tools_dir=$target_dir/release-tools
# Archives, SBOMs and images carry the commit's time, not the build's.
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
export SOURCE_DATE_EPOCH=$epoch
if [ "$image" = 1 ] && ! command -v "$(echo "${PODMAN:-podman}" | cut -d" " -f1)" >/dev/null 2>&1; then
  echo "podman is needed for the image (Debian: apt-get install podman); --no-image builds the binaries only" >&2
  exit 1
fi

# Debian packages, when missing (needs root).
apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "missing: $* (Debian: apt-get install $*, as root)" >&2
    exit 1
  fi
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

tools() {
  command -v file >/dev/null || apt_install file
  command -v cargo-auditable >/dev/null || cargo install --locked --version "$CARGO_AUDITABLE" cargo-auditable
  command -v auditable2cdx >/dev/null || cargo install --locked --version "$AUDITABLE2CDX" auditable2cdx
}

# The native x86_64 build uses musl-gcc; every other one, cargo-zigbuild.
native() {
  [ "$1" = x86_64 ] && [ "$(uname -m)" = x86_64 ]
}

need() {
  if native "$1"; then
    command -v musl-gcc >/dev/null || apt_install musl-tools
  elif ! command -v cargo-zigbuild >/dev/null; then
    # From PyPI into a folder of the build's own (no system Python is
    # touched); its zig is found through PYTHONPATH (python3 -m ziglang).
    local py=$tools_dir/python
    if [ ! -x "$py/bin/cargo-zigbuild" ]; then
      python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
      python3 -m pip install -q --disable-pip-version-check --target "$py" \
        "ziglang==$ZIGLANG" "cargo-zigbuild==$CARGO_ZIGBUILD"
    fi
    export PATH="$py/bin:$PATH" PYTHONPATH="$py${PYTHONPATH:+:$PYTHONPATH}"
  fi
  rustup target add "$1-unknown-linux-musl" >/dev/null
}

build() {
  local arch=$1 triple=$1-unknown-linux-musl
  # Neither this checkout's path nor the registry's goes into the binary
  # (added to the caller's RUSTFLAGS; paths with spaces kept whole).
  local sep=$'\x1f' flags
  flags="--remap-path-prefix=$PWD=/envrender$sep--remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo"
  [ -z "${RUSTFLAGS:-}" ] || flags="$(printf '%s' "$RUSTFLAGS" | tr ' ' "$sep")$sep$flags"
  # cargo-auditable runs $CARGO (cargo, or cargo-zigbuild); run as `cargo
  # auditable`, cargo would set CARGO to itself.
  local cargo=cargo
  native "$arch" || cargo="cargo-zigbuild"
  CARGO_ENCODED_RUSTFLAGS="$flags" CARGO=$cargo \
    cargo-auditable auditable build --locked --release --target "$triple" >&2
  echo "$target_dir/$triple/release/envrender"
}

check() {
  local arch=$1 bin=$2 machine
  case "$arch" in
    x86_64) machine="x86-64" ;;
    aarch64) machine="aarch64" ;;
  esac
  local what
  what=$(file -b "$bin")
  case "$what" in
    *"$machine"*static*) ;;
    *)
      echo "$bin is not a static $arch binary: $what" >&2
      exit 1
      ;;
  esac
  if [ "$arch" = "$(uname -m)" ]; then
    "$bin" --version
  elif command -v "qemu-$arch-static" >/dev/null; then
    "qemu-$arch-static" "$bin" --version
  fi
}

tools
mkdir -p "$dist"
rm -f "$dist/SHA256SUMS"
made=()
host_bin=""
for arch in "${archs[@]}"; do
  need "$arch"
  bin=$(build "$arch")
  check "$arch" "$bin"
  name="envrender-$version-$arch-linux-musl"
  cp "$bin" "$dist/$name"
  auditable2cdx "$dist/$name" >"$dist/$name.cdx.json"
  made+=("$name" "$name.cdx.json" "$name.tar.gz")
  [ "$arch" != "$(uname -m)" ] || host_bin="$dist/$name"
done
# Completions and the man page come from the command line's definition,
# the same for every architecture: generated once, by a binary that runs
# here.
if [ -z "$host_bin" ]; then
  need "$(uname -m)"
  host_bin=$(build "$(uname -m)")
fi
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/completions" "$stage/man"
"$host_bin" completions bash >"$stage/completions/envrender.bash"
"$host_bin" completions zsh >"$stage/completions/_envrender"
"$host_bin" completions fish >"$stage/completions/envrender.fish"
"$host_bin" manpage >"$stage/man/envrender.1"
cp LICENSE README.md "$stage/"
for arch in "${archs[@]}"; do
  name="envrender-$version-$arch-linux-musl"
  cp "$dist/$name" "$stage/envrender"
  tar --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner \
    -C "$stage" -cf - envrender LICENSE README.md completions man | gzip -n >"$dist/$name.tar.gz"
done
if [ "$image" = 1 ]; then
  DIST=$dist deploy/image/build.sh "$tag" "${archs[@]}"
  made+=("envrender-$version-image.oci.tar")
fi
# The files of this run only.
(cd "$dist" && sha256sum "${made[@]}" >SHA256SUMS)
cat "$dist/SHA256SUMS"
for arch in "${archs[@]}"; do
  stat -c '%s bytes  %n' "$dist/envrender-$version-$arch-linux-musl"
done
