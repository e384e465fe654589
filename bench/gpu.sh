#!/usr/bin/env bash
# One prepared model-runtime benchmark for a GPU machine (see bench/engine.py):
#   bench/gpu.sh            7B-shaped random checkpoint (about 14 GB, written once to $CKPT_DIR)
#   bench/gpu.sh --tiny     tiny random checkpoint, runs on a CPU
# Needs torch (a CUDA build on GPU hosts), transformers >= 5, safetensors, sentencepiece,
# numpy, pillow (protobuf for the tokenizer.json copy). Prints one table; exit 1 when the
# engine's greedy tokens differ from plain generate().
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import torch, transformers' 2>/dev/null; then
    PY=.venv/bin/python
  else
    PY=python3
  fi
fi
"$PY" - <<'PYCHECK'
import importlib, sys
missing = [m for m in ("torch", "transformers", "safetensors", "sentencepiece", "numpy", "PIL")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"bench/gpu.sh: missing Python packages: {', '.join(missing)}")
import torch, transformers
if int(transformers.__version__.split(".")[0]) < 5:
    sys.exit(f"bench/gpu.sh: transformers {transformers.__version__} < 5 (the static cache API differs)")
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers "
      f"{transformers.__version__}, cuda {torch.cuda.is_available()}", file=sys.stderr)
PYCHECK
if [[ "${1:-}" == "--tiny" ]]; then
  shift
  exec "$PY" bench/engine.py --tiny --device "${DEVICE:-cpu}" "$@"
fi
CKPT_DIR="${CKPT_DIR:-/tmp/cxr-llava-random-7b}"
exec "$PY" bench/engine.py --dir "$CKPT_DIR" "$@"
