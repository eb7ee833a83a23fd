#!/bin/sh
# Builds envrender as a fully static binary (glibc, crt-static) and lays out
# the image's files in OUT:
#   OUT/root/envrender                          the binary
#   OUT/root/etc/ssl/certs/ca-certificates.crt  the CA bundle (TLS to AWS, Vault, Consul)
#   OUT/root/etc/passwd, OUT/root/etc/group     root and nonroot (65532)
#   OUT/volumes/{run/app,run/envrender,envrender-bin}
#       the paths deploy/ mounts volumes on, copied in owned by 65532: an ECS
#       task volume takes its owner from the image, so envrender can write it
# Run from the repository root: deploy/image/rootfs.sh OUT
set -eu
umask 022
out=$1
command -v readelf >/dev/null || { echo "rootfs.sh: readelf (binutils) is needed" >&2; exit 1; }
target=$(rustc -vV | sed -n 's/^host: //p')
# --target keeps build scripts and proc macros dynamic; only envrender is static.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --release --locked --target "$target" --bin envrender
bin="${CARGO_TARGET_DIR:-target}/$target/release/envrender"
headers=$(readelf -l "$bin")
if printf '%s\n' "$headers" | grep -q 'program interpreter'; then
  echo "rootfs.sh: $bin is dynamically linked" >&2
  exit 1
fi
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
rm -rf "$out"
root=$out/root
mkdir -p "$root/etc/ssl/certs" "$out/volumes/run/app" "$out/volumes/run/envrender" "$out/volumes/envrender-bin"
cp "$bin" "$root/envrender"
cp "$ca" "$root/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$root/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$root/etc/group"
echo "rootfs.sh: $out ($(wc -c < "$root/envrender") bytes of envrender)"
