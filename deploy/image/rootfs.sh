#!/bin/sh
# Builds envrender as a fully static binary (glibc, crt-static) and lays out
# the image's root file system in OUT:
#   OUT/envrender                          the binary
#   OUT/etc/ssl/certs/ca-certificates.crt  the CA bundle (for TLS to AWS, Vault, Consul)
#   OUT/etc/passwd, OUT/etc/group          root and nonroot (65532)
# Run from the repository root: deploy/image/rootfs.sh OUT
set -eu
out=$1
target=$(rustc -vV | sed -n 's/^host: //p')
# --target keeps build scripts and proc macros dynamic; only envrender is static.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --release --locked --target "$target" --bin envrender
bin="${CARGO_TARGET_DIR:-target}/$target/release/envrender"
if readelf -l "$bin" | grep -q 'program interpreter'; then
  echo "rootfs.sh: $bin is dynamically linked" >&2
  exit 1
fi
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
rm -rf "$out"
mkdir -p "$out/etc/ssl/certs"
cp "$bin" "$out/envrender"
cp "$ca" "$out/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$out/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$out/etc/group"
echo "rootfs.sh: $out ($(wc -c < "$out/envrender") bytes of envrender)"
