#!/usr/bin/env bash
# Mesa's lavapipe (Vulkan on the CPU) from bookworm-backports, so ORT's WebGPU EP (Dawn) runs without a GPU.
# Bookworm's own Mesa 22.3 is refused by Dawn ("Vulkan shaderUniform*ArrayDynamicIndexing required"); 25.x works.
set -euo pipefail
if dpkg-query -W -f='${Status} ${Version}\n' mesa-vulkan-drivers 2>/dev/null | grep -q '^install ok installed 2[5-9]'; then exit 0; fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers >/dev/null
