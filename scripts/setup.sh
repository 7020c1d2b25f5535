#!/usr/bin/env bash
# Create .venv and install pneumoclip with every version pinned by constraints.txt
# (which pins torch to the CPU wheel, so pip never pulls a multi-GB CUDA build).
#   bash scripts/setup.sh          # runtime
#   bash scripts/setup.sh --dev    # runtime + pytest, ruff, and the PostgreSQL server the
#                                  # tests run MLflow on (installed with apt where missing)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
if [ -n "$extras" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
    && ! command -v initdb >/dev/null; then
  echo "setup: installing the PostgreSQL server (apt) for the MLflow backend-store tests"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
.venv/bin/python -c 'import sys; assert sys.version_info[:2] == (3, 11), "pneumoclip needs Python 3.11"'
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".${extras}"
# A GPU user who installed a CUDA torch on purpose sets PNEUMOCLIP_ALLOW_CUDA=1.
[ -n "${PNEUMOCLIP_ALLOW_CUDA:-}" ] || .venv/bin/python -c \
  'import torch; assert not torch.version.cuda, "constraints.txt should have given the CPU torch wheel"'
echo "setup: .venv ready ($(.venv/bin/pip --version | cut -d' ' -f1-2), torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
