#!/usr/bin/env bash
# Entrypoint of the nanochat images: one image for `nanochat` commands, `ray` and anything else.
#
#   (no arguments)            nanochat --help
#   nanochat ARGS | ray ARGS  run as given (so does any program on PATH: sh -c '...', python ...)
#   ARGS                      nanochat ARGS, e.g. `docker run IMAGE speedrun --preset tiny-cpu`
#
# Before running anything it checks that HOME and TMPDIR are writable: with a read-only root filesystem
# they must be volumes, and failing here with the fix named beats a stack trace from deep inside Ray.
# KubeRay's Ray containers bypass this script (it runs its own `bash -lc "ray start ..."`), which is why
# the images set the same defaults with ENV.
set -euo pipefail

export HOME="${HOME:-/data}"
export TMPDIR="${TMPDIR:-/tmp}"

require_writable() {  # NAME PATH
  local name=$1 dir=$2
  mkdir -p -- "$dir" 2> /dev/null || true
  if [[ ! -d $dir || ! -w $dir ]]; then
    cat >&2 << EOF
nanochat: $name=$dir is not a writable directory for uid $(id -u).
The root filesystem is read-only in this image's intended use: mount a volume at $dir
(Kubernetes: an emptyDir or a PersistentVolumeClaim; docker: -v nanochat-data:$dir or --tmpfs $dir),
or point $name at a writable directory.
EOF
    exit 78  # EX_CONFIG: a deployment problem, not a crash
  fi
}

require_writable HOME "$HOME"
require_writable TMPDIR "$TMPDIR"

if [[ $# -eq 0 ]]; then
  set -- nanochat --help
elif [[ $1 == -* ]] || ! type -P -- "$1" > /dev/null; then
  # not a program on PATH (nanochat's subcommands are not: data, tok, train, eval, speedrun, serve, chat,
  # report), or an option: the arguments are nanochat's
  set -- nanochat "$@"
fi
exec "$@"
