#!/bin/sh
# Lays out the image's files for each architecture from the static binaries
# deploy/release.sh put in DIST (default dist/):
#   OUT/ARCH/root/envrender                          the binary
#   OUT/ARCH/root/LICENSE                            its licence (Apache-2.0)
#   OUT/ARCH/root/etc/ssl/certs/ca-certificates.crt  the CA bundle (TLS to AWS, Vault, Consul)
#   OUT/ARCH/root/etc/passwd, etc/group              root and nonroot (65532)
#   OUT/ARCH/owned/{run/app,run/envrender,envrender-bin}
#       the paths deploy/ mounts volumes on, owned by 65532 in the image, so
#       a volume that takes its owner from the image is writable by envrender
# ARCH is the image platform's name: amd64, arm64.
# Run from the repository root: deploy/image/rootfs.sh OUT [x86_64|aarch64 ...]
set -eu
umask 022
out=$1
shift
[ $# -gt 0 ] || set -- x86_64 aarch64
dist=${DIST:-dist}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
rm -rf "$out"
for arch in "$@"; do
  case "$arch" in
    x86_64) platform=amd64 machine=x86-64 ;;
    aarch64) platform=arm64 machine=aarch64 ;;
    *) echo "rootfs.sh: unknown architecture $arch (x86_64 or aarch64)" >&2; exit 2 ;;
  esac
  bin=$dist/envrender-$version-$arch-linux-musl
  if [ ! -f "$bin" ]; then
    echo "rootfs.sh: $bin is missing: run deploy/release.sh $arch first" >&2
    exit 1
  fi
  case "$(file -b "$bin")" in
    *"$machine"*static*) ;;
    *) echo "rootfs.sh: $bin is not a static $arch binary" >&2; exit 1 ;;
  esac
  root=$out/$platform/root
  owned=$out/$platform/owned
  mkdir -p "$root/etc/ssl/certs" "$owned/run/app" "$owned/run/envrender" "$owned/envrender-bin"
  cp "$bin" "$root/envrender"
  cp LICENSE "$root/LICENSE"
  cp "$ca" "$root/etc/ssl/certs/ca-certificates.crt"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
  echo "rootfs.sh: $out/$platform ($(wc -c <"$root/envrender") bytes of envrender)"
done
