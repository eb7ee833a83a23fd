#!/bin/sh
# Builds envrender's image from deploy/image/Containerfile without pulling
# anything: the `build` stage's work (rootfs.sh) runs on this machine, and its
# output replaces that stage through --build-context, so podman runs only the
# final FROM scratch stage.
#   deploy/image/build.sh [TAG]            (default localhost/envrender:dev)
# PODMAN overrides the podman command, e.g. on machines that need
#   PODMAN="podman --runtime runc --cgroup-manager=cgroupfs"
set -eu
repo=$(cd "$(dirname "$0")/../.." && pwd)
tag=${1:-localhost/envrender:dev}
ctx=${CARGO_TARGET_DIR:-$repo/target}/image-context
cd "$repo"
deploy/image/rootfs.sh "$ctx/out"
${PODMAN:-podman} build --quiet --build-context build="$ctx" \
  -f deploy/image/Containerfile -t "$tag" "$ctx"
