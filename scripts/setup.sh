#!/usr/bin/env bash
# Set up switchml on a fresh Debian machine: the Mininet packages (root only) and a
# virtual environment in .venv with switchml installed in editable mode. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# Debian packages for the emulated networks. The core (switch, workers, trainer on
# loopback) needs none of them, so a machine without root still gets a working install.
packages="mininet iperf3 bridge-utils nftables ethtool"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=$(for p in $packages; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  if [ -n "$missing" ]; then
    echo "setup: installing $missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
else
  echo "setup: not root or no apt-get: skipping $packages (only the Mininet parts need them)"
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# Everything (the extras, switchml/extras.py) and the test tools. torch==2.14.1 / torchvision==0.29.1 are
# pinned in pyproject.toml; pip takes them from this machine's disk.
.venv/bin/pip install -q --disable-pip-version-check -e ".[all,test]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import switchml, torch; assert torch.__version__.startswith('2.14.1'), torch.__version__"

# Debian's Mininet installs its Python package for Debian's python3; link just that package into the venv.
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ -d /usr/lib/python3/dist-packages/mininet ] && [ ! -e "$site/mininet" ]; then
  ln -s /usr/lib/python3/dist-packages/mininet "$site/mininet"
fi
echo "setup: done (.venv)"
