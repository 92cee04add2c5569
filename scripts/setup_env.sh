#!/usr/bin/env bash
# Creates the project's virtual environment (.venv by default) and installs dpar-scale into it.
#
# Why a script and not just `pip install -e .`: torch must come from the right place.
#  * A GPU cluster usually has torch (built for its CUDA) already installed. Then we create the venv with
#    --system-site-packages so that torch is reused, and pip sees the requirement satisfied: it is never replaced.
#  * A machine without torch gets torch==$TORCH_VERSION (default 2.13.0). Asking pip for an unpinned `torch` on a
#    CPU machine can pull a multi-GB CUDA build; a pinned version resolves to the CPU build where one is provided
#    (set PIP_EXTRA_INDEX_URL to a CPU wheel index on machines that need it).
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
EXTRAS=${EXTRAS:-dev}

if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] reusing the installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
  "$PYTHON" -m venv --system-site-packages "$VENV"
else
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  echo "[setup] installing torch==$TORCH_VERSION"
  "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
fi
# DeepSpeed compiles its CUDA/C++ ops lazily on first use; do not try to pre-build them at install time.
export DS_BUILD_OPS=${DS_BUILD_OPS:-0}
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[$EXTRAS]"
"$VENV/bin/python" -c "import torch, deepspeed, fvcore, submitit, wandb, sentencepiece; print('[setup] ok: torch', torch.__version__)"
