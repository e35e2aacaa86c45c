#!/usr/bin/env bash
# The whole pipeline on this machine: .venv, then `nanochat speedrun` with the tiny-cpu preset on the
# embedded defaults (local Ray, storage in $NANOCHAT_STORAGE or ~/.cache/nanochat). Extra arguments go to
# `nanochat speedrun`, e.g. ./speedrun.sh --run try2 --set train.max_steps=50
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-venv.sh
exec .venv/bin/nanochat speedrun --preset tiny-cpu "$@"
