#!/usr/bin/env bash
# One-time set-up, idempotent: Fashion-MNIST, the Mosquitto broker and a C compiler from Debian (when
# root and missing), a virtualenv in .venv with the pinned requirements, and this package installed in it.
set -euo pipefail
cd "$(dirname "$0")"
missing=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing+=(dataset-fashion-mnist)
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v cc >/dev/null || missing+=(gcc)  # builds the allocator counter that checks the peak-memory estimate
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null \
    || echo "setup: could not install ${missing[*]}; see README (Fashion-MNIST can be downloaded, a broker given by --broker)"
fi
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
