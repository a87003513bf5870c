#!/usr/bin/env bash
# Rebuild BENCHMARKS.md and bench/results/ from the shipped models (~15 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
exec ./run bench --out bench/results --markdown BENCHMARKS.md "$@"
