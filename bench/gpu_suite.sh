#!/usr/bin/env bash
# The GPU checks of issues 9 and 10 as prepared runs on a lent device (H100/H200 class):
#   memory: every method at real size and resolution (SD1.5 512 px, SDXL 1024 px) for a few dozen
#           steps: img/s, peak memory (torch.cuda.max_memory_allocated) against the planner, loss;
#   speed:  bench/train_throughput.py --size sd15|sdxl, eager and compiled (training.compile on,
#           CUDA graphs), against the diffusers-recipe reference: img/s, ratio, peak memory, loss,
#           compile seconds, graph breaks. LoRA at batch 1/4/16, SDXL LoRA, DreamBooth, TI.
# One device call runs one part (each about 8 minutes; the session has ~15 min of device time):
# Prepare here:   bash bench/gpu_wheels.sh
# Then call the device tool's run with
#   command: "bash bench/gpu_suite.sh speed", carry: [".whl"], timeout_s: 560     (or "memory")
# Results land in $OUT (the device tool brings them back): realsize.jsonl, memory_table.md,
# throughput.jsonl, log.txt. Each stage has its own time limit, so one that hangs still leaves the
# others' numbers.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/log.txt"; }
stage() { local limit=$1; shift; log "$*"; timeout "$limit" "$@" 2>&1 | grep -v 'it/s]' | tee -a "$OUT/log.txt"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/log.txt"
python3 -c "import torch, diffusers, peft, transformers; print(torch.__version__, diffusers.__version__, peft.__version__, transformers.__version__)" | tee -a "$OUT/log.txt"

PART="${1:-speed}"
if [ "$PART" = memory ]; then
  # Real size, real resolution. SD1.5 first (the bases are written on first use, ~1 min each).
  stage 150 python3 bench/realsize.py --device cuda --size sd15 --resolutions 512 --batch-size 4 --steps 30 \
    --out "$OUT/realsize.jsonl"
  stage 200 python3 bench/realsize.py --device cuda --size sdxl --resolutions 1024 --batch-size 2 --steps 20 \
    --out "$OUT/realsize.jsonl"
  stage 20 python3 bench/fit_memory.py --check "$OUT/realsize.jsonl" > "$OUT/memory_table.md"
  cat "$OUT/memory_table.md" | tee -a "$OUT/log.txt"
  exit 0
fi

# Throughput against the diffusers-example reference loop (same model, data, seed, batch), eager
# and compiled; the compiled runs' warm-up steps include compiling (reported as compile_s).
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/atelier-inductor}"
# Inductor's gradients against eager's first (on the CPU they are wrong: bench/compiled_grads.py).
stage 90 python3 bench/compiled_grads.py --size sd15 --device cuda --backend inductor --resolution 256
for args in "--size sd15 --method lora --batch-size 4 --compile off" "--size sd15 --method lora --batch-size 4 --compile on" \
  "--size sd15 --method lora --batch-size 1 --compile on" "--size sd15 --method lora --batch-size 16 --compile on" \
  "--size sd15 --method dreambooth --batch-size 4 --compile on" "--size sd15 --method textual_inversion --batch-size 4 --compile on" \
  "--size sdxl --method lora --batch-size 4 --compile on"; do
  # The first run of each size also writes its random-weight base (~30 s SD1.5, ~60 s SDXL).
  limit=60; case "$args" in *"sdxl"*|*"batch-size 4 --compile off"*) limit=120;; esac
  # shellcheck disable=SC2086
  stage "$limit" python3 bench/train_throughput.py $args --steps 15 --warmup 3 | tail -1 >> "$OUT/throughput.jsonl"
done
cat "$OUT/throughput.jsonl" | tee -a "$OUT/log.txt"
