#!/usr/bin/env bash
# Set up .venv with reopold and its test tools on a fresh machine.
# Without an NVIDIA GPU the CPU build of torch is installed first, so the torch range in pyproject.toml is already
# satisfied and pip never resolves it to a multi-GB CUDA wheel. TORCH_SPEC overrides what is installed
# (e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" on machines whose PyPI
# serves CUDA builds).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        .venv/bin/python -m pip install --quiet ${TORCH_SPEC:-"torch>=2.4,<2.15"}
    else
        .venv/bin/python -m pip install --quiet ${TORCH_SPEC:-"torch==2.13.0"}
    fi
fi
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -c "import reopold, torch; print(f'reopold {reopold.__version__} with torch {torch.__version__} is ready in .venv')"
