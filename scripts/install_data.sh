#!/usr/bin/env bash
# Installs the real-text corpora of DATA.md from Debian's packages, once. Nothing is downloaded
# at run time: training reads the installed files.
set -euo pipefail
pydocs=/usr/share/doc/python3.11/html/_sources
zh=/usr/share/games/fortunes/tang300
if [ -d "$pydocs" ] && [ -e "$zh" ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null; then
  echo "The corpora need: apt-get install python3.11-doc fortunes-zh (as root)" >&2
  exit 1
fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
echo "installing corpora: python3.11-doc fortunes-zh (Debian packages)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3.11-doc fortunes-zh >/dev/null
