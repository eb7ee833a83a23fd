#!/bin/sh
# Builds envrender's image for each architecture from the static binaries in
# dist/ (deploy/release.sh builds them, then calls this script), without
# pulling anything: the Containerfile's `build` stage is replaced by a build
# context holding rootfs.sh's output, so only the FROM scratch stage runs (no
# emulation is needed for arm64).
#   deploy/image/build.sh [TAG [x86_64|aarch64 ...]]
# makes, for TAG (default localhost/envrender:dev):
#   TAG-amd64, TAG-arm64                    one image per architecture, here
#   dist/envrender-VERSION-image.oci.tar    the multi-arch image: both images
#                                           and their index (manifest list)
# Images carry the commit's time, so the same commit builds the same digests.
# Push the multi-arch image with
#   skopeo copy --all oci-archive:dist/envrender-VERSION-image.oci.tar docker://REGISTRY/envrender:VERSION
# PODMAN overrides the podman command, e.g. on machines that need
#   PODMAN="podman --runtime runc --cgroup-manager=cgroupfs"
set -eu
repo=$(cd "$(dirname "$0")/../.." && pwd)
tag=${1:-localhost/envrender:dev}
[ $# -eq 0 ] || shift
[ $# -gt 0 ] || set -- x86_64 aarch64
cd "$repo"
podman=${PODMAN:-podman}
dist=${DIST:-dist}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
source=$(sed -n 's/^repository = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
revision=$(git rev-parse HEAD 2>/dev/null || echo "${ENVRENDER_COMMIT:-unknown}")
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
work=$(mktemp -d)
list="localhost/envrender-build-list-$$"
cleanup() {
  # Podman 4.3 cannot list images while a local manifest list exists: the
  # list lives only as long as this script.
  $podman manifest rm "$list" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
deploy/image/rootfs.sh "$work/out" "$@"
$podman manifest create "$list" >/dev/null
for arch in "$@"; do
  case "$arch" in
    x86_64) platform=amd64 ;;
    aarch64) platform=arm64 ;;
  esac
  $podman build --quiet --platform "linux/$platform" --timestamp "$epoch" \
    --build-context build="$work" \
    --build-arg VERSION="$version" --build-arg REVISION="$revision" --build-arg SOURCE="$source" \
    -f deploy/image/Containerfile -t "$tag-$platform" "$work" >/dev/null
  $podman manifest add "$list" "containers-storage:$tag-$platform" >/dev/null
  size=$($podman image inspect --format '{{.Size}}' "$tag-$platform")
  echo "build.sh: $tag-$platform ($size bytes)"
done
archive=$dist/envrender-$version-image.oci.tar
mkdir -p "$dist"
rm -f "$archive"
# An OCI layout directory, archived with the commit's time and sorted names.
$podman manifest push --quiet --all "$list" "oci:$work/layout:$version" >/dev/null
tar --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner \
  -C "$work/layout" -cf "$archive" .
echo "build.sh: $archive ($(wc -c <"$archive") bytes: $*)"
