#!/usr/bin/env bash
# Install (idempotent) what the container test needs on a fresh Debian machine: podman with runc,
# debootstrap for a locally made base image, and the networking pieces podman's port publishing uses.
# Run as root (CI and the developers' machines are root). Configuration lives in
# scripts/containers/{containers,storage}.conf and is selected with CONTAINERS_CONF /
# CONTAINERS_STORAGE_CONF (see scripts/container_env.sh), so no global podman setting is changed.
set -euo pipefail
need=()
for tool in podman debootstrap runc iptables; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install_container_tools.sh: missing ${need[*]}; run this script as root (apt-get install)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends podman runc debootstrap iptables \
      containernetworking-plugins golang-github-containers-common uidmap ca-certificates >/dev/null
fi
podman --version
