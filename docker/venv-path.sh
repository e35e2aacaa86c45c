# shellcheck shell=sh
# /etc/profile.d/nanochat-venv.sh in the nanochat images. KubeRay starts Ray with `/bin/bash -lc`, and a
# login shell's /etc/profile resets PATH (Debian and Ubuntu do): put the image's venv back in front.
case ":${PATH}:" in
  *":${VIRTUAL_ENV:-/opt/venv}/bin:"*) ;;
  *) PATH="${VIRTUAL_ENV:-/opt/venv}/bin:${PATH}" ;;
esac
export PATH
