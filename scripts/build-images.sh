#!/usr/bin/env bash
# Builds nanochat's container images, CPU (REPO:VERSION) and NVIDIA GPU (REPO:VERSION-cuda), and optionally
# pushes them. VERSION is the chart's appVersion (helm/nanochat/Chart.yaml), which must equal pyproject's.
#
#   scripts/build-images.sh                                  # both images, tagged ghcr.io/nanochat/nanochat:VERSION[-cuda]
#   scripts/build-images.sh --only cpu                       # the CPU image only
#   scripts/build-images.sh --push registry.example.com/nanochat   # tag under that name and push
#
# Works with or without a reachable registry: the one image taken from outside, the Debian base (--base,
# default debian:bookworm-slim), is used if present locally, else pulled, else made from Debian packages with
# mmdebstrap and imported. A CA bundle (--ca-bundle, default the system's) reaches pip inside the build as a
# BuildKit secret, never stored in the image. The CPU image takes torch's CPU wheel from a local folder when
# one holds it (--torch-wheels, default pip's find-links), else from download.pytorch.org's CPU index.
# Idempotent: a second run reuses the base and Docker's build cache.
set -euo pipefail
cd "$(dirname "$0")/.."

DEFAULT_REPO=ghcr.io/nanochat/nanochat
SYSTEM_CA=/etc/ssl/certs/ca-certificates.crt

usage() {
  cat << EOF
usage: scripts/build-images.sh [options]

  --only cpu|gpu       build one image (default: both)
  --repo REPO          image name to tag (default: $DEFAULT_REPO, the chart's image.repository)
  --push REPO          tag as REPO:VERSION[-cuda] and push, e.g. --push registry.example.com/nanochat
  --base IMAGE         Debian bookworm base image (default: debian:bookworm-slim)
  --ca-bundle FILE     CA bundle for pip inside the build, as a build secret (default: $SYSTEM_CA
                       when it exists; --ca-bundle none passes none)
  --torch-wheels DIR   folder holding torch's CPU wheel (default: pip's find-links, PIP_FIND_LINKS or pip config)
  -h, --help           this text

Tags: REPO:VERSION (CPU) and REPO:VERSION-cuda (GPU), VERSION being helm/nanochat/Chart.yaml's appVersion.
EOF
}

die() {
  echo "build-images: error: $*" >&2
  exit 1
}

say() {
  echo "build-images: $*" >&2
}

only="" repo=$DEFAULT_REPO push=0 base=debian:bookworm-slim ca_bundle="" wheels_dir=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --only) only=${2:-}; shift 2 || die "--only needs cpu or gpu" ;;
    --repo) repo=${2:-}; shift 2 || die "--repo needs an image name" ;;
    --push) repo=${2:-}; push=1; shift 2 || die "--push needs an image name, e.g. registry.example.com/nanochat" ;;
    --base) base=${2:-}; shift 2 || die "--base needs an image" ;;
    --ca-bundle) ca_bundle=${2:-}; shift 2 || die "--ca-bundle needs a file (or none)" ;;
    --torch-wheels) wheels_dir=${2:-}; shift 2 || die "--torch-wheels needs a folder" ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
case $only in
  "") flavours=(cpu gpu) ;;
  cpu | gpu) flavours=("$only") ;;
  *) die "--only must be cpu or gpu, not '$only'" ;;
esac
[[ -n $repo && ${repo##*/} != *:* ]] || die "--repo/--push takes an image name without a tag (got '$repo')"
[[ -n $base ]] || die "--base needs an image"
[[ -z $wheels_dir || -d $wheels_dir ]] || die "--torch-wheels $wheels_dir is not a folder"

# --- the version: the chart's appVersion, which must be pyproject's version ----------------------------------
version=$(sed -n 's/^appVersion:[[:space:]]*"\{0,1\}\([^"]*\)"\{0,1\}[[:space:]]*$/\1/p' helm/nanochat/Chart.yaml)
py_version=$(sed -n 's/^version[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' pyproject.toml | head -n 1)
[[ -n $version ]] || die "no appVersion in helm/nanochat/Chart.yaml"
[[ $version == "$py_version" ]] ||
  die "helm/nanochat/Chart.yaml appVersion ($version) differs from pyproject.toml version ($py_version); make them equal"
torch_version=$(sed -n 's/^[[:space:]]*"torch==\([^"]*\)".*/\1/p' pyproject.toml | head -n 1)
[[ -n $torch_version ]] || die "no torch==VERSION pin in pyproject.toml"
python_version=$(sed -n 's/^ARG PYTHON_VERSION=//p' docker/Dockerfile.cpu)

# --- a Docker client that builds with BuildKit ---------------------------------------------------------------
# `docker buildx build` where the buildx plugin is installed; else a client whose own `docker build` drives
# the engine's BuildKit (DOCKER_BUILDKIT=1), such as Debian's docker.io. Newer clients without buildx refuse.
pick_client() {
  local candidates=() c
  command -v docker > /dev/null 2>&1 && candidates+=("$(command -v docker)")
  for c in /usr/bin/docker /usr/local/bin/docker; do
    [[ -x $c ]] && candidates+=("$c")
  done
  [[ ${#candidates[@]} -gt 0 ]] || die "no docker client found; install Docker (Debian: apt-get install docker.io)"
  for c in "${candidates[@]}"; do
    if "$c" buildx version > /dev/null 2>&1; then
      client=$c build_cmd=("$c" buildx build --load)
      return
    fi
  done
  for c in "${candidates[@]}"; do
    if DOCKER_BUILDKIT=1 "$c" build --help 2>&1 | grep -q -- '--secret'; then
      client=$c build_cmd=("$c" build)
      return
    fi
  done
  die "no docker client here can build with BuildKit (tried: ${candidates[*]}): install the buildx plugin" \
    "(docker-buildx-plugin) or a client that accepts DOCKER_BUILDKIT=1 (Debian: apt-get install docker.io)"
}
client="" build_cmd=()
pick_client
export DOCKER_BUILDKIT=1
if ! "$client" info > /dev/null 2>&1; then
  scripts/start-docker.sh || die "the Docker engine does not answer ($client info) and could not be started"
fi
say "client: ${build_cmd[*]}"

# --- the base ------------------------------------------------------------------------------------------------
make_debian_base() {  # IMAGE: the Debian bookworm minbase, from Debian packages, imported as IMAGE
  if ! command -v mmdebstrap > /dev/null 2>&1; then
    if [[ $(id -u) != 0 ]] || ! command -v apt-get > /dev/null 2>&1; then
      die "$1 is not local, cannot be pulled, and mmdebstrap (to make it from Debian packages) is missing:" \
        "install mmdebstrap, or load the base with docker load/pull"
    fi
    say "installing mmdebstrap with apt-get ..."
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap) \
      > /dev/null || die "apt-get could not install mmdebstrap"
  fi
  local tarball
  tarball=$(mktemp /tmp/nanochat-base.XXXXXX.tar)
  # shellcheck disable=SC2064
  trap "rm -f '$tarball'" EXIT
  say "making $1 from Debian packages (mmdebstrap --variant=minbase bookworm) ..."
  # as in Debian's slim images: no manuals, docs or translations
  mmdebstrap --variant=minbase --quiet \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    bookworm "$tarball" \
    "deb http://deb.debian.org/debian bookworm main" \
    "deb http://deb.debian.org/debian bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" ||
    die "mmdebstrap failed to make the Debian base"
  "$client" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    --message "Debian bookworm minbase made by scripts/build-images.sh (mmdebstrap)" \
    "$tarball" "$1" > /dev/null || die "docker import of the Debian base failed"
  rm -f "$tarball"
}

if "$client" image inspect "$base" > /dev/null 2>&1; then
  say "base: $base (local)"
elif "$client" pull "$base" > /dev/null 2>&1; then
  say "base: $base (pulled)"
elif [[ $base == debian:bookworm* ]]; then
  make_debian_base "$base"
  say "base: $base (made from Debian packages)"
else
  die "base image $base is neither local nor pullable; load it (docker load) or use --base debian:bookworm-slim"
fi

# --- secrets and wheels --------------------------------------------------------------------------------------
secret_args=()
if [[ -z $ca_bundle && -f $SYSTEM_CA ]]; then
  ca_bundle=$SYSTEM_CA
fi
if [[ -n $ca_bundle && $ca_bundle != none ]]; then
  [[ -f $ca_bundle ]] || die "--ca-bundle $ca_bundle is not a file"
  secret_args=(--secret "id=ca,src=$ca_bundle")
  say "CA bundle: $ca_bundle (build secret, not stored in the images)"
fi

find_links() {  # the folders pip looks in for local wheels
  if [[ -n $wheels_dir ]]; then
    echo "$wheels_dir"
    return
  fi
  local links=${PIP_FIND_LINKS:-}
  if [[ -z $links ]] && command -v python3 > /dev/null 2>&1; then
    links=$(python3 -m pip config get global.find-links 2> /dev/null || true)
  fi
  tr -s ' ' '\n' <<< "$links" | sed 's|^file://||'
}

# docker/wheels/ is part of the build context: it holds the CPU wheel when one is found (a hard link, so no
# copy of a large file), and nothing otherwise
stage_torch_wheel() {  # prints the wheel's name when one is staged
  mkdir -p docker/wheels
  local tag=cp${python_version//./} dir wheel="" pattern arch
  arch=$(uname -m)
  pattern="torch-${torch_version}+cpu-${tag}-${tag}-*linux*_${arch}.whl"
  while read -r dir; do
    [[ -n $dir && -d $dir ]] || continue
    wheel=$(find "$dir" -maxdepth 1 -name "$pattern" | sort | tail -n 1)
    [[ -n $wheel ]] && break
  done < <(find_links)
  find docker/wheels -maxdepth 1 -name '*.whl' ! -name "$(basename "${wheel:-none}")" -delete
  if [[ -n $wheel ]]; then
    local staged
    staged=docker/wheels/$(basename "$wheel")
    if [[ ! $staged -ef $wheel ]] && ! cmp -s "$wheel" "$staged"; then
      ln -f "$wheel" "$staged" 2> /dev/null || cp -f "$wheel" "$staged"
    fi
    basename "$wheel"
  fi
}

# --- build ---------------------------------------------------------------------------------------------------
summary=()
for flavour in "${flavours[@]}"; do
  tag=$repo:$version
  args=(--build-arg "BASE_IMAGE=$base")
  if [[ $flavour == gpu ]]; then
    tag=$tag-cuda
  else
    wheel=$(stage_torch_wheel)
    if [[ -n $wheel ]]; then
      say "torch: local wheel $wheel (dependencies from PyPI)"
      args+=(--build-arg "TORCH_INDEX_URL=https://pypi.org/simple")
    else
      say "torch: no local torch==$torch_version CPU wheel; using download.pytorch.org's CPU index"
    fi
  fi
  say "building $tag from docker/Dockerfile.$flavour ..."
  previous=$("$client" image inspect -f '{{.Id}}' "$tag" 2> /dev/null || true)
  start=$(date +%s)
  "${build_cmd[@]}" -f "docker/Dockerfile.$flavour" "${args[@]}" "${secret_args[@]}" -t "$tag" . ||
    die "the $flavour image failed to build (see the output above)"
  seconds=$(($(date +%s) - start))
  # the image this tag named before, now untagged: removed unless a container or another tag still uses it
  if [[ -n $previous && $previous != $("$client" image inspect -f '{{.Id}}' "$tag") ]]; then
    "$client" rmi "$previous" > /dev/null 2>&1 || true
  fi
  if [[ $push == 1 ]]; then
    say "pushing $tag ..."
    "$client" push "$tag" || die "docker push $tag failed (log in first: docker login ${repo%%/*})"
  fi
  size=$("$client" image inspect -f '{{.Size}}' "$tag")
  summary+=("$(printf '%-50s %8.2f GB %6d s' "$tag" "$(awk "BEGIN {print $size / 1e9}")" "$seconds")")
done

printf '%-50s %11s %8s\n' IMAGE SIZE BUILD
printf '%s\n' "${summary[@]}"
