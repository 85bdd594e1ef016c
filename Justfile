# VoIPC tasks. `just run` starts a server; `just test` runs the whole suite.

set shell := ["bash", "-euo", "pipefail", "-c"]
# Pass recipe arguments through as they are ("$@"), so invite links keep their & and ?.
set positional-arguments

# Debian packages the build and the tests need (gcc and make build aws-lc; protoc builds libsignal).
packages := "build-essential pkg-config protobuf-compiler"

# List the recipes.
default:
    @just --list

# Install the system packages the build and tests need (quick when they are there).
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    if ! command -v dpkg-query >/dev/null; then
        echo "setup: not a Debian-like system; install the equivalents of: {{packages}}" >&2
        exit 0
    fi
    missing=""
    for p in {{packages}}; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
        echo "setup: installing$missing"
        $sudo apt-get update -qq
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
    fi

# Build the optimised binary.
build: setup
    cargo build --release

# Build and run voipc; with no arguments it hosts a server (`just run join voipc://...` connects).
run *args='serve': build
    ./target/release/voipc "$@"

# Host a server (arguments go to `voipc serve`, e.g. --config server.toml).
serve *args: build
    ./target/release/voipc serve "$@"

# Connect a headless client (arguments go to `voipc join`).
join *args: build
    ./target/release/voipc join "$@"

# The whole test suite: unit tests, then the real binary end to end.
test: setup
    cargo test --all-targets

# Relay throughput and latency against a plain-UDP baseline, vault unlock time, chat message rates, then the micro-benchmarks.
bench *args: build
    ./target/release/voipc bench relay "$@"
    ./target/release/voipc bench vault
    ./target/release/voipc bench chat
    cargo bench --bench hot_paths

# Formatting and clippy, warnings denied.
lint:
    cargo fmt --check
    cargo clippy --all-targets -- -D warnings
