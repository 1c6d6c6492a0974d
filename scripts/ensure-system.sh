#!/usr/bin/env bash
# Install the system packages the plane needs when they are missing: ffmpeg/ffprobe,
# python3-venv where Debian split it out of python3, Debian's chromium for the UI screenshot
# test (Playwright drives it; its own browser downloads are not used), espeak-ng (the second
# local TTS engine), and curl and jq (the consumer contract's curl session).
set -euo pipefail
PYTHON=${PYTHON:-python3}
missing=()
command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
command -v ffprobe >/dev/null 2>&1 || missing+=(ffmpeg)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v jq >/dev/null 2>&1 || missing+=(jq)
# Debian's python3 needs python3-venv (ensurepip) to make the project's virtual environment.
if [ ! -x .venv/bin/python ] && ! "$PYTHON" -c "import ensurepip, venv" >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "need root or sudo to apt-get install ${missing[*]}" >&2; exit 1; }
  SUDO="sudo"
fi
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "installing ${packages[*]} with apt-get" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${packages[@]}"
