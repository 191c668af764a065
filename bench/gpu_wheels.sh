#!/usr/bin/env bash
# Run HERE (not on the device) before bench/gpu_suite.sh: downloads, as wheels into .whl/, the
# packages the lent GPU machine's image lacks (its PyTorch, transformers, peft, accelerate and
# safetensors are used as they are; see /work/.library/device/KINDS.md). .whl/ is git-ignored via
# .git/info/exclude and travels with `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 any; do
  platforms+=(--platform "$tag")
done
# diffusers and what the loop imports beyond the device image (pydantic for the job spec, the
# settings loader). Not bitsandbytes: its CUDA wheel alone is over the 64 MiB a call may carry.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 annotated-types \
  typing-inspection python-dotenv importlib-metadata
ls -la .whl
du -sh .whl
