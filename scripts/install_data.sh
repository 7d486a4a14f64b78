#!/usr/bin/env bash
# Installs the real-text corpora of DATA.md from Debian's packages, once. Nothing is downloaded
# at run time: training reads the installed files. Exits non-zero, saying why, where it cannot
# (no root or sudo, no apt-get): `make demo` then falls back to the standard library's source.
set -euo pipefail
pydocs=/usr/share/doc/python3.11/html/_sources
zh=/usr/share/games/fortunes/tang300
if [ -d "$pydocs" ] && [ -e "$zh" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "The corpora are Debian packages (python3.11-doc fortunes-zh) and this machine has no apt-get" >&2
  exit 1
fi
if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null; then
  echo "The corpora need: apt-get install python3.11-doc fortunes-zh (as root)" >&2
  exit 1
fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
echo "installing corpora: python3.11-doc fortunes-zh (Debian packages)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3.11-doc fortunes-zh >/dev/null
