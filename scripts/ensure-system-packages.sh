#!/usr/bin/env bash
# Install Debian packages for the commands that are missing, so that `make run` / `make test`
# work on a fresh Debian machine. Arguments: COMMAND=PACKAGE pairs (COMMAND may be an absolute
# path of a file the package installs); a package is installed only when its command is not
# on PATH or its file is absent (a command that came another way, e.g. nodesource, is kept).
set -euo pipefail
missing=()
for pair in "$@"; do
  cmd="${pair%%=*}"
  pkg="${pair#*=}"
  if [[ "$cmd" == /* ]]; then
    [ -e "$cmd" ] || missing+=("$pkg")  # an absolute path: a file the package installs
  else
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing system packages: ${missing[*]}"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
