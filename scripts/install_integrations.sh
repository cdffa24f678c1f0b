#!/usr/bin/env bash
# Set up .venv-integrations: reopold with TRL and verl at the versions reopold.integrations was tested against, on
# the CPU torch. verl's own requirements pull a CUDA stack (vLLM, flash-attn, ...) that is not needed to import its
# loss registry, so verl is installed without dependencies plus exactly what `import verl` and its distillation
# losses need (docs/integrations.md). Then: .venv-integrations/bin/python -m pytest -m integrations
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
venv=.venv-integrations
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -c "import torch" 2>/dev/null || "$venv/bin/python" -m pip install --quiet ${TORCH_SPEC:-"torch==2.13.0"}
"$venv/bin/python" -m pip install --quiet -e ".[dev,trl]"
"$venv/bin/python" -m pip install --quiet --no-deps "verl==0.9.1"
"$venv/bin/python" -m pip install --quiet "ray==2.60.0" "tensordict==0.15.3" "hydra-core==1.3.8" "codetiming==1.4.0" \
    "torchdata==0.11.0" "pylatexenc==2.11" "pybind11==3.1.0" "orjson==3.13.0"
"$venv/bin/python" -c "import torch, trl, verl; print(f'trl {trl.__version__}, verl {verl.__version__} with torch {torch.__version__} in $venv')"
