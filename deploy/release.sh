#!/usr/bin/env bash
# Builds envrender's release artifacts into dist/:
#   envrender-VERSION-x86_64-linux-musl, envrender-VERSION-aarch64-linux-musl
#     fully static binaries (musl), stripped;
#   envrender-VERSION-ARCH-linux-musl.tar.gz
#     the binary, LICENSE, README.md, shell completions and the man page;
#   SHA256SUMS.
# The x86_64 binary is built with musl-gcc (Debian's musl-tools), the arm64
# one with cargo-zigbuild (PyPI's ziglang and cargo-zigbuild); both are
# installed when missing. Each binary is checked to be static for its
# architecture and to run (the arm64 one under qemu-aarch64-static, when
# present). CARGO_TARGET_DIR is honoured.
#
#   deploy/release.sh            # both architectures
#   deploy/release.sh x86_64     # one
set -euo pipefail
cd "$(dirname "$0")/.."

archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=(x86_64 aarch64)
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
target_dir=${CARGO_TARGET_DIR:-target}
# Archives carry the commit's time, not the build's.
epoch=$(git log -1 --format=%ct 2>/dev/null || echo 0)

need() {
  case "$1" in
    x86_64)
      command -v musl-gcc >/dev/null || { apt-get update -q && apt-get install -y -q musl-tools; }
      ;;
    aarch64)
      command -v cargo-zigbuild >/dev/null || python3 -m pip install -q ziglang cargo-zigbuild
      ;;
    *)
      echo "unknown architecture $1 (x86_64 or aarch64)" >&2
      exit 2
      ;;
  esac
  rustup target add "$1-unknown-linux-musl" >/dev/null
}

build() {
  local arch=$1 triple=$1-unknown-linux-musl
  if [ "$arch" = x86_64 ]; then
    cargo build --locked --release --target "$triple"
  else
    cargo zigbuild --locked --release --target "$triple"
  fi
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

mkdir -p dist
rm -f dist/SHA256SUMS
host_bin=""
for arch in "${archs[@]}"; do
  need "$arch"
  bin=$(build "$arch" | tail -n1)
  check "$arch" "$bin"
  name="envrender-$version-$arch-linux-musl"
  cp "$bin" "dist/$name"
  [ "$arch" != "$(uname -m)" ] || host_bin="dist/$name"
done
# Completions and the man page come from the command line's definition,
# the same for every architecture: generated once, by a binary that runs
# here.
[ -n "$host_bin" ] || host_bin=$(build "$(uname -m)" | tail -n1)
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
  cp "dist/$name" "$stage/envrender"
  tar --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner \
    -C "$stage" -cf - envrender LICENSE README.md completions man | gzip -n >"dist/$name.tar.gz"
done
(cd dist && sha256sum envrender-"$version"-* >SHA256SUMS)
cat dist/SHA256SUMS
for arch in "${archs[@]}"; do
  stat -c '%s bytes  %n' "dist/envrender-$version-$arch-linux-musl"
done
