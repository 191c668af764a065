#!/usr/bin/env bash
# The GPU checks of issues 9 and 10 as ONE prepared run on a lent device (H100/H200 class, ~8 min):
#   1. every method at real size and resolution (SD1.5 512 px, SDXL 1024 px) for a few dozen steps:
#      img/s, peak memory (torch.cuda.max_memory_allocated) against the planner's estimate, loss;
#   2. bench/train_throughput.py --size sd15|sdxl: Atelier's loop against the diffusers recipe.
# Prepare here:   bash bench/gpu_wheels.sh
# Then call the device tool's run with
#   command: "bash bench/gpu_suite.sh", carry: [".whl"], timeout_s: 560
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

# 1. Real size, real resolution. SD1.5 first (the bases are written on first use, ~1 min each).
stage 150 python3 bench/realsize.py --device cuda --size sd15 --resolutions 512 --batch-size 4 --steps 30 \
  --out "$OUT/realsize.jsonl"
stage 200 python3 bench/realsize.py --device cuda --size sdxl --resolutions 1024 --batch-size 2 --steps 20 \
  --out "$OUT/realsize.jsonl"
stage 20 python3 bench/fit_memory.py --check "$OUT/realsize.jsonl" > "$OUT/memory_table.md"
cat "$OUT/memory_table.md" | tee -a "$OUT/log.txt"

# 2. Throughput against the diffusers-example reference loop (same model, data, seed, batch).
for args in "--size sd15 --method lora --batch-size 4" "--size sd15 --method lora --batch-size 16" \
  "--size sdxl --method lora --batch-size 4" "--size sd15 --method dreambooth --batch-size 4" \
  "--size sd15 --method textual_inversion --batch-size 4"; do
  # shellcheck disable=SC2086
  stage 60 python3 bench/train_throughput.py $args --steps 10 --warmup 3 | tail -1 >> "$OUT/throughput.jsonl"
done
cat "$OUT/throughput.jsonl" | tee -a "$OUT/log.txt"
