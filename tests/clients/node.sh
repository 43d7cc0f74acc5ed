#!/usr/bin/env bash
# Installs (once) the pinned JavaScript Azure client, @azure/identity, into .tools/node/ for
# tests/clients/test_clients.py (its ManagedIdentityCredential speaks IMDS and the App Service
# protocol through @azure/msal-node). Idempotent: reinstalls only when the pin changes. Prints
# nothing on success; needs node >= 20 and npm (the registry is used only on the first run).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dir="$repo/.tools/node"
# 4.13.1 is the newest release that supports Node 20 (4.13.2 and later need Node 22).
packages=("@azure/identity@4.13.1")
stamp="$dir/.azgate-node-packages"

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    # A fresh machine: Debian's packages (this image's release ships Node 20).
    if command -v apt-get >/dev/null; then
        echo "node.sh: installing nodejs and npm from Debian" >&2
        sudo=""
        [[ "$(id -u)" == 0 ]] || sudo="sudo"
        $sudo apt-get update -qq >&2
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >&2
    fi
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
        echo "node.sh: node (>= 20) and npm are required" >&2
        exit 1
    fi
fi
if [[ -f "$stamp" && "$(cat "$stamp")" == "${packages[*]}" && -d "$dir/node_modules/@azure/identity" ]]; then
    exit 0
fi
echo "node.sh: installing ${packages[*]} into $dir" >&2
mkdir -p "$dir"
[[ -f "$dir/package.json" ]] || echo '{"name":"azgate-client-tests","private":true}' >"$dir/package.json"
npm install --prefix "$dir" --no-audit --no-fund --save-exact --loglevel=error "${packages[@]}" >&2
echo "${packages[*]}" >"$stamp"
