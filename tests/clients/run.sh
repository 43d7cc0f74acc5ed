#!/usr/bin/env bash
# Real Azure clients against azgate: Python azure-identity's ManagedIdentityCredential and the
# az CLI get managed-identity tokens through `azgate token-service`, which fetches them from
# `azgate imds-emulator`. Everything runs on 127.0.0.1; only PyPI and crates.io are needed to
# set up (the venv is created once at .venv/ and reused).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"

venv="$repo/.venv"
requirements=("azure-cli==2.91.*" "azure-identity==1.27.*" "pytest==9.*")
stamp="$venv/.azgate-clients-requirements"

if [[ ! -x "$venv/bin/python" ]]; then
    echo "run.sh: creating $venv" >&2
    python3 -m venv "$venv"
fi
# Install when the pins change (or on a fresh venv); ~1 minute and ~700 MB for azure-cli.
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "${requirements[*]}" ]]; then
    echo "run.sh: installing ${requirements[*]}" >&2
    "$venv/bin/python" -m pip install --disable-pip-version-check --quiet "${requirements[@]}"
    echo "${requirements[*]}" >"$stamp"
fi

# CI runs this from a clean clone: build into the default target dir and point the tests at it.
env -u CARGO_TARGET_DIR cargo build --quiet -p azgate
export AZGATE_BIN="$repo/target/debug/azgate"

exec "$venv/bin/python" -m pytest -p no:cacheprovider -v tests/clients "$@"
