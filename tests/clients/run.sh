#!/usr/bin/env bash
# Real Azure clients against azgate: Python azure-identity's ManagedIdentityCredential, MSAL
# Python's ManagedIdentityClient, JavaScript's @azure/identity and the az CLI get managed-identity
# tokens through `azgate token-service` (IMDS and App Service protocols), which fetches them from
# `azgate-imds-emulator` (the test double's own binary). Everything runs on 127.0.0.1; only PyPI, npm and crates.io are needed
# to set up (the venv is created once at .venv/, @azure/identity once at .tools/node/ by
# tests/clients/node.sh, and both reused).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"

venv="$repo/.venv"
bash "$repo/tests/clients/venv.sh"

# CI runs this from a clean clone: build into the default target dir and point the tests at it.
env -u CARGO_TARGET_DIR cargo build --quiet -p azgate -p azgate-emulator
export AZGATE_BIN="$repo/target/debug/azgate"
export AZGATE_EMULATOR_BIN="$repo/target/debug/azgate-imds-emulator"

exec "$venv/bin/python" -m pytest -p no:cacheprovider -v tests/clients "$@"
