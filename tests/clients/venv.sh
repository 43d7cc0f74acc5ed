#!/usr/bin/env bash
# Creates (once) and updates .venv/ with the pinned real Azure clients: the az CLI, Python
# azure-identity and pytest. Used by tests/clients/run.sh and `make test-workstation`.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="$repo/.venv"
requirements=("azure-cli==2.91.*" "azure-identity==1.27.*" "pytest==9.*")
stamp="$venv/.azgate-clients-requirements"

if [[ ! -x "$venv/bin/python" ]]; then
    echo "venv.sh: creating $venv" >&2
    python3 -m venv "$venv"
fi
# Install when the pins change (or on a fresh venv); ~1 minute and ~700 MB for azure-cli.
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "${requirements[*]}" ]]; then
    echo "venv.sh: installing ${requirements[*]}" >&2
    "$venv/bin/python" -m pip install --disable-pip-version-check --quiet "${requirements[@]}"
    echo "${requirements[*]}" >"$stamp"
fi
