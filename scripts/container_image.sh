#!/usr/bin/env bash
# Build the CPU image of optsel with podman, from a Debian 12 base made here with debootstrap (no image
# registry needed), the same torch CPU wheel scripts/setup.sh installs, and the pinned package set
# requirements/lock.txt. Idempotent and cached: the base image, podman's layer cache and pip's cache
# persist on the machine, so a rebuild after a source change only reinstalls the optsel wheel.
#   bash scripts/container_image.sh            # -> localhost/optsel:0.1.0-cpu
# Env: OPTSEL_IMAGE (tag), OPTSEL_BASE_IMAGE (tag of the debootstrapped base), OPTSEL_CACHE (/var/cache/optsel),
#      DEBIAN_MIRROR (http://deb.debian.org/debian), CA_BUNDLE (the CA bundle pip trusts inside the build).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_container_tools.sh >/dev/null
source scripts/container_env.sh
IMAGE=${OPTSEL_IMAGE:-localhost/optsel:0.1.0-cpu}
BASE=${OPTSEL_BASE_IMAGE:-localhost/optsel-base:bookworm}
CACHE=${OPTSEL_CACHE:-/var/cache/optsel}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
PY=${PYTHON:-python3}
mkdir -p "$CACHE"
t0=$(date +%s)

if ! podman image exists "$BASE"; then
  # A minimal Debian 12 with the Python the CPU torch wheel is built for (3.11) and g++ and headers for
  # DeepSpeed's JIT-built CPU ops; docs and apt lists trimmed.
  root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  echo "container_image: debootstrap bookworm -> $BASE" >&2
  debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,g++,ca-certificates \
      bookworm "$root" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
         "$root"/usr/share/man/* "$root"/usr/share/locale/*
  tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
  rm -rf "$root"; trap - EXIT
fi
t1=$(date +%s)

# The torch CPU wheel, from the source scripts/setup.sh uses (pip's configured find-links/index);
# copied once into the cache and handed to the build as the `wheels` build context.
WHEELS="$CACHE/wheels"
mkdir -p "$WHEELS"
if ! ls "$WHEELS"/torch-2.13.0*.whl >/dev/null 2>&1; then
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$WHEELS" "torch==2.13.0"
fi

podman build --quiet=false --layers --format docker \
    --build-arg BASE_IMAGE="$BASE" --build-arg TORCH_VARIANT=cpu \
    --build-context wheels="$WHEELS" \
    --secret id=ca,src="$CA" \
    -t "$IMAGE" -f Dockerfile . >&2
t2=$(date +%s)
podman image prune -f >/dev/null   # earlier builds' untagged images; the current image's layers stay cached
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "container_image: $IMAGE built; base $((t1 - t0)) s, build $((t2 - t1)) s, size $((size / 1000000)) MB" >&2
echo "$IMAGE"
