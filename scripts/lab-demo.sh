#!/usr/bin/env bash
# Causeway's main job on an embedded default: build a two-site lab in
# network namespaces on this machine, join the sites with the causeway
# daemon, show a pod in one reaching a pod in the other, tear it all down.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
ensure_root
ensure_packages
cargo build --release --quiet --bin causeway --bin causeway-bench
exec target/release/causeway-bench demo "$@"
