#!/usr/bin/env bash
# Podman and mmdebstrap from Debian for tests/stack/test_compose_stack.py, which builds the images and runs
# the compose stack (no Docker engine here). runc: crun refuses this machine's hybrid cgroups; uidmap
# and fuse-overlayfs are podman's storage helpers. Settings: .ci/containers.conf (CONTAINERS_CONF).
set -uo pipefail
packages=(podman mmdebstrap runc uidmap fuse-overlayfs)
if ! command -v apt-get >/dev/null; then
  echo "warning: no apt-get; the container test needs ${packages[*]}"
  exit 0
fi
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if (( ${#missing[@]} )); then
  (apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; }) \
    || echo "warning: could not install ${missing[*]}; the container test will fail (RIGL_REQUIRE_CONTAINERS=1)"
fi
