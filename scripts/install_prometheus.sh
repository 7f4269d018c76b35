#!/usr/bin/env bash
# Install Debian's `prometheus` package (the server and promtool) if promtool or prometheus is missing.
# Idempotent: does nothing when both are on PATH. Used by CI before pytest (tests/e2e/test_metrics.py,
# tests/e2e/test_prometheus_e2e.py). Never starts the packaged service: tests run their own server.
set -euo pipefail
if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  echo "prometheus already installed: $(prometheus --version 2>&1 | head -n1)"
  exit 0
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=(sudo); else
    echo "install_prometheus.sh: need root (or sudo) to apt-get install prometheus" >&2; exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
# Keep the package's service from starting (containers without systemd, and CI runners with it):
# a policy-rc.d that refuses every action, removed again afterwards unless one already existed.
POLICY=/usr/sbin/policy-rc.d
ADDED_POLICY=0
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
  "${SUDO[@]}" chmod +x "$POLICY"
  ADDED_POLICY=1
fi
cleanup() { if [ "$ADDED_POLICY" = 1 ]; then "${SUDO[@]}" rm -f "$POLICY"; fi; }
trap cleanup EXIT
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends prometheus
command -v promtool >/dev/null && command -v prometheus >/dev/null
echo "installed: $(prometheus --version 2>&1 | head -n1)"
