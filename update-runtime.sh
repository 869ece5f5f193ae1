#!/usr/bin/env bash
# Creates .venv (Python 3.11, 3.12 or 3.13: whichever the machine has) and installs the pinned runtime. Run it again after pulling: it is instant
# when nothing changed and only installs what changed otherwise.
#
#   ./update-runtime.sh            torch for this machine: CUDA when nvidia-smi answers, else CPU
#   ./update-runtime.sh --cpu      CPU torch (also what a machine with no NVIDIA GPU gets)
#   ./update-runtime.sh --cuda     CUDA torch
#   ./update-runtime.sh --rocm     ROCm torch (AMD GPUs)
#   ./update-runtime.sh --dev      also the test tools (pytest, ruff); combines with the above
#   PYTHON=/path/to/python3.x ./update-runtime.sh    use that interpreter (3.11 to 3.13)
#
# torch 2.14.1 + torchvision 0.29.1: the newest pair that installs and imports together here (torch 2.13.0's
# CPU wheel has no torchvision that loads beside it, and the post-processors need torchvision). On Linux the
# PyPI wheels of this pair are CUDA builds; they run on a CPU too. For --cpu the script prefers PyTorch's
# CPU-only wheels (much smaller) when their index is reachable and falls back to PyPI's otherwise.
set -euo pipefail
cd "$(dirname "$0")"

TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
ROCM_INDEX=${TORCH_ROCM_INDEX:-https://download.pytorch.org/whl/rocm6.4}

flavor=auto
dev=0
for arg in "$@"; do
  case "$arg" in
    --cpu) flavor=cpu ;;
    --cuda) flavor=cuda ;;
    --rocm) flavor=rocm ;;
    --dev) dev=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "update-runtime.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$flavor" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then flavor=cuda; else flavor=cpu; fi
fi

supported() { "$1" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))' 2>/dev/null; }
python_bin=${PYTHON:-}
if [ -n "$python_bin" ] && ! supported "$python_bin"; then
  echo "update-runtime.sh: $python_bin is not Python 3.11, 3.12 or 3.13" >&2
  exit 1
fi
if [ -z "$python_bin" ]; then
  # The machine's own python3 first (Ubuntu 24.04: 3.12), then any supported version it has.
  for candidate in python3 python3.12 python3.13 python3.11; do
    if command -v "$candidate" >/dev/null 2>&1 && supported "$candidate"; then
      python_bin=$candidate; break
    fi
  done
fi
if [ -z "$python_bin" ]; then
  echo "update-runtime.sh: Python 3.11, 3.12 or 3.13 is required (set PYTHON=/path/to/python3.x)" >&2
  exit 1
fi
if [ -x .venv/bin/python ] && ! supported .venv/bin/python; then
  echo "update-runtime.sh: .venv holds an unsupported Python; remove .venv and run again" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $python_bin ($("$python_bin" -c 'import platform; print(platform.python_version())'))"
  "$python_bin" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)

# The stamp records what the venv was built from: unchanged inputs mean nothing to do.
stamp_file=.venv/.runtime-stamp
venv_python=$(.venv/bin/python -c 'import platform; print(platform.python_version())')
inputs=$(cat requirements.txt; [ "$dev" = 1 ] && cat requirements-dev.txt; echo "$flavor $TORCH_VERSION $TORCHVISION_VERSION $venv_python")
stamp=$(printf '%s' "$inputs" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ]; then
  echo "runtime up to date ($flavor torch $TORCH_VERSION)"
  exit 0
fi

reachable() { .venv/bin/python - "$1" <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=5)
except Exception:
    sys.exit(1)
PY
}

torch_pkgs=("torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION")
installed_torch=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)
if [ "${installed_torch%%+*}" != "$TORCH_VERSION" ] || [ ! -f .venv/.torch-flavor ] || [ "$(cat .venv/.torch-flavor)" != "$flavor" ]; then
  echo "installing $flavor torch $TORCH_VERSION + torchvision $TORCHVISION_VERSION"
  case "$flavor" in
    cpu)
      if reachable "$CPU_INDEX/"; then
        "${pip[@]}" install --index-url "$CPU_INDEX" "${torch_pkgs[@]}"
      else
        echo "PyTorch's CPU index is not reachable: using the PyPI wheels (larger, run on CPU too)"
        "${pip[@]}" install "${torch_pkgs[@]}"
      fi ;;
    cuda) "${pip[@]}" install "${torch_pkgs[@]}" ;;
    rocm) "${pip[@]}" install --index-url "$ROCM_INDEX" "${torch_pkgs[@]}" ;;
  esac
  echo "$flavor" > .venv/.torch-flavor
fi

# Hold the installed torch so that no dependency can swap in another build.
constraints=.venv/.torch-constraints.txt
.venv/bin/python - > "$constraints" <<'PY'
import importlib.metadata as m
for name in ("torch", "torchvision"):
    print(f"{name}=={m.version(name)}")
PY
echo "installing the pinned runtime"
"${pip[@]}" install -c "$constraints" -r requirements.txt
if [ "$dev" = 1 ]; then
  "${pip[@]}" install -c "$constraints" -r requirements-dev.txt
fi
.venv/bin/python -c 'import torch, torchvision, diffusers, transformers; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'
echo "$stamp" > "$stamp_file"
echo "runtime ready: .venv ($flavor)"
