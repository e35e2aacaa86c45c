#!/usr/bin/env bash
# Starts the Docker engine where nothing else does (a container or VM without systemd), for the image builds
# and the container tests. Idempotent: returns at once when `docker info` answers; otherwise starts dockerd in
# the background (log: $DOCKERD_LOG, default /tmp/dockerd.log) and waits up to $DOCKER_START_TIMEOUT seconds
# (default 30) for it to answer. Exit status 0: the engine answers; 1: it does not, with the reason on stderr.
#   scripts/start-docker.sh
set -uo pipefail

log=${DOCKERD_LOG:-/tmp/dockerd.log}
timeout=${DOCKER_START_TIMEOUT:-30}

engine_answers() {
  docker info > /dev/null 2>&1
}

if engine_answers; then
  exit 0
fi
if ! command -v docker > /dev/null 2>&1; then
  echo "start-docker: no docker client on PATH (Debian: apt-get install docker.io)" >&2
  exit 1
fi
dockerd_bin=$(command -v dockerd || true)
if [[ -z $dockerd_bin ]]; then
  echo "start-docker: the Docker engine (dockerd) is not installed (Debian: apt-get install docker.io)" >&2
  exit 1
fi
if [[ $(id -u) != 0 ]]; then
  echo "start-docker: the Docker engine is not running and only root can start dockerd; start it" \
    "(sudo $dockerd_bin &) or add this user to the docker group" >&2
  exit 1
fi
if ! pgrep -x dockerd > /dev/null 2>&1; then
  # a pid file left by a daemon that died with its machine (a restored snapshot, a power cut) stops dockerd
  # from starting: "pid file found, ensure docker is not running"
  pidfile=/var/run/docker.pid
  if [[ -f $pidfile ]] && ! ps -p "$(cat "$pidfile")" -o comm= 2> /dev/null | grep -qx dockerd; then
    echo "start-docker: removing the stale $pidfile (no dockerd runs as pid $(cat "$pidfile"))" >&2
    rm -f "$pidfile"
  fi
  echo "start-docker: starting $dockerd_bin (log: $log) ..." >&2
  # setsid: the daemon outlives this script and the shell or test session that ran it
  setsid "$dockerd_bin" > "$log" 2>&1 < /dev/null &
fi
for ((i = 0; i < timeout * 2; i++)); do
  if engine_answers; then
    exit 0
  fi
  sleep 0.5
done
echo "start-docker: the Docker engine did not answer within ${timeout}s; the end of $log:" >&2
tail -n 20 "$log" >&2 2> /dev/null
exit 1
