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
  found=$("$PYTHON" -c 'import torch; print(torch.__version__)')
  # pyproject asks for torch>=2.6 (FSDP2 fully_shard, DTensor parallel plans); an older cluster torch would make pip
  # replace it with a download, so stop and say so instead.
  if ! "$PYTHON" -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 6))'; then
    echo "[setup] error: dpar-scale needs torch >= 2.6, found $found at $PYTHON. Install a newer torch built for" \
         "your CUDA first, or point PYTHON= at an interpreter that has one." >&2
    exit 1
  fi
  echo "[setup] reusing the installed torch $found"
  "$PYTHON" -m venv --system-site-packages "$VENV"
  # --system-site-packages exposes the *base* interpreter's packages. When torch lives in a virtual environment
  # of its own (sys.prefix != sys.base_prefix), expose that environment's site-packages too, through a .pth file.
  parent_site=$("$PYTHON" -c 'import site, sys; print("\n".join(site.getsitepackages()) if sys.prefix != sys.base_prefix else "")')
  if [ -n "$parent_site" ]; then
    own_site=$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')
    printf '%s\n' "$parent_site" > "$own_site/_dpar_parent_env.pth"
  fi
  if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__ != '$found')"; then
    echo "[setup] error: the new venv $VENV does not see torch $found from $PYTHON; install dpar-scale into that" \
         "environment directly: $PYTHON -m pip install -e '.[$EXTRAS]'" >&2
    exit 1
  fi
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
