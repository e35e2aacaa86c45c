#!/usr/bin/env bash
# Creates .venv and installs nanochat into it; cheap when nothing changed (a stamp holds the hash of
# pyproject.toml and the extras). Usage: scripts/setup-venv.sh [EXTRAS]   e.g. "test" or "test,bench"
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
  echo "nanochat needs Python 3.10 or newer; $python is $("$python" --version 2>&1)" >&2; exit 1; }

[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.nanochat-installed
want="$(cat pyproject.toml | sha256sum | cut -c1-16) extras=[$extras]"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "Installing nanochat into .venv (extras: ${extras:-none}) ..." >&2
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned, with pip: pip picks a local CPU build where one is offered; uv would fetch a CUDA build.
# Then the rest with uv (installed into .venv by pip): it keeps that torch, which satisfies the pin, and takes
# seconds where pip takes a minute and a half. Unlike pip, uv writes no bytecode unless asked; without it, and
# with PYTHONDONTWRITEBYTECODE set (as on CI machines), every process (each Ray worker) compiles ray, jax,
# fastapi... from source again.
.venv/bin/pip install -q "torch==2.13.0" uv
spec="."
[ -n "$extras" ] && spec=".[$extras]"
.venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python -e "$spec"
echo "$want" > "$stamp"
