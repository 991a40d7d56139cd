#!/usr/bin/env bash
# Create .venv and install bipost into it. Used by `make demo` / `make test`.
#
# torch: an installed torch is kept (GPU machines usually have a CUDA build already: the venv
# then sees the system packages); on a machine without a GPU we install the CPU wheel and never
# let pip resolve an unpinned torch (that pulls a multi-GB CUDA build).
set -euo pipefail
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
EXTRAS=${EXTRAS:-dev}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[install] keeping the torch installed for $PY (venv with system site packages)"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[install] GPU found: installing torch==$TORCH_VERSION (CUDA build)"
    "${pip[@]}" "torch==$TORCH_VERSION"
  elif "${pip[@]}" --no-index --no-deps "torch==$TORCH_VERSION" >/dev/null 2>&1; then
    # A CPU wheel that pip's own config finds on disk (find-links). Its dependencies then come
    # from the configured indexes; torch itself is already satisfied, so no CUDA build is fetched.
    echo "[install] no GPU: installed the local CPU wheel of torch==$TORCH_VERSION"
    "${pip[@]}" "torch==$TORCH_VERSION"
  else
    echo "[install] no GPU: installing the CPU build of torch==$TORCH_VERSION from $TORCH_CPU_INDEX"
    "${pip[@]}" "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX"
  fi
fi
"${pip[@]}" -e ".[${EXTRAS}]"
touch "$VENV/.installed"
