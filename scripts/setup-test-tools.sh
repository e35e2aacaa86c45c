#!/usr/bin/env bash
# Tools the test suite drives for real, beyond Python packages: Chromium (web UI tests), Prometheus (dashboard
# queries), helm and kubectl (chart checks), actionlint (the release workflow), the Docker engine and
# mmdebstrap (image builds and container tests; tests/deploy/containers.py starts dockerd through
# scripts/start-docker.sh). Installed once; tests that need a missing tool skip and say why.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

need_apt=()
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
command -v dockerd >/dev/null 2>&1 || need_apt+=(docker.io)
command -v mmdebstrap >/dev/null 2>&1 || need_apt+=(mmdebstrap)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing ${need_apt[*]} with apt-get ..." >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}") >/dev/null 2>&1 \
      || echo "warning: could not install ${need_apt[*]}; the tests that need them will be skipped" >&2
  else
    echo "warning: ${need_apt[*]} missing and apt-get not usable as this user; the tests that need them will be skipped" >&2
  fi
fi
if [ ! -x .tools/bin/helm ] && [ -x scripts/get-helm.sh ]; then
  scripts/get-helm.sh .tools/bin >/dev/null 2>&1 || echo "warning: could not install helm; chart tests will be skipped" >&2
fi
if [ ! -x .tools/bin/actionlint ] && [ -x scripts/get-actionlint.sh ]; then
  scripts/get-actionlint.sh .tools/bin >/dev/null 2>&1 || echo "warning: could not install actionlint; the workflow lint will be skipped" >&2
fi
exit 0
