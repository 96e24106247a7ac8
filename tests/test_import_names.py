"""Our import names are ours alone. kernels/ installs as grpo_kernels: the top-level name `kernels` is Hugging
Face's package, which transformers (5.25 and newer) imports when it builds a model, so a `kernels` of ours broke
every entry point, from the repository root and from any other folder."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import transformers
from packaging.version import Version

from tests.conftest import REPO

OURS = "grpo-trainer"

# In a fresh interpreter, as an entry point starts: the embedded model's first layer and LM head run through
# transformers' model code (which imports `kernels`) and through our log-prob kernels. Prints where `kernels`
# came from and one log-prob.
PROBE = """
import importlib.util, sys
if sys.argv[1] == "scripts":
    sys.path.insert(0, sys.argv[2])  # what scripts/*.py do first: the repository root at the front
import torch
from grpo_kernels.dispatch import token_logprobs
from grpo.config import EMBEDDED_MODEL
from grpo.model.loading import load_model
model = load_model(EMBEDDED_MODEL, device=torch.device("cpu"), dtype=torch.float32)
hidden = model.model(torch.tensor([[1, 2, 3]])).last_hidden_state[0]
logp = token_logprobs(hidden, model.lm_head.weight, torch.tensor([4, 5, 6]), impl="chunked")
spec = importlib.util.find_spec("kernels")
print(spec and spec.origin)
print(f"{logp.sum().item():.6f}")
"""


def hf_kernels_file() -> str | None:
    """The __init__.py of Hugging Face's `kernels` distribution, or None where it is not installed."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    return str(Path(dist.locate_file("kernels/__init__.py")).resolve())


def test_hf_kernels_is_installed_where_transformers_needs_it():
    # The probes below prove nothing without the package they could collide with.
    if Version(transformers.__version__) >= Version("5.25"):
        assert hf_kernels_file() is not None, "transformers >= 5.25 depends on Hugging Face's kernels package"


@pytest.mark.parametrize(
    "where, how",
    [("root", "python -c"), ("root", "scripts"), ("elsewhere", "python -c"), ("elsewhere", "scripts")],
)
def test_transformers_and_our_kernels_both_import(where, how, tmp_path):
    cwd = REPO if where == "root" else tmp_path
    mode = "scripts" if how == "scripts" else "plain"
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, mode, str(REPO)], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    origin, logp = proc.stdout.split()[-2:]
    expected = hf_kernels_file()
    if expected is not None:
        assert str(Path(origin).resolve()) == expected
    else:  # nothing but, at most, our folder as an empty namespace, which transformers does not take for HF's
        assert origin == "None"
    assert float(logp) < 0


def test_our_kernels_folder_is_no_regular_package():
    # A kernels/__init__.py would make the folder win over HF's package wherever the repository root is on
    # sys.path (the scripts put it first).
    assert not (REPO / "kernels" / "__init__.py").exists()
    spec = importlib.util.find_spec("grpo_kernels.dispatch")
    assert spec is not None and Path(spec.origin).resolve() == REPO / "kernels" / "dispatch.py"


def top_level_names() -> set[str]:
    """Every top-level import name we make importable: setup.py's packages, and the packages at the root that
    the tests and scripts import (scripts, tests)."""
    names = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    return names | {"grpo", "grpo_kernels"}


def clashes(names: set[str]) -> dict[str, list[str]]:
    """name -> the installed distributions other than ours that ship it, and folders of that name elsewhere on
    sys.path (a distribution without a file list still shows there)."""
    shipped = importlib.metadata.packages_distributions()
    out: dict[str, list[str]] = {}
    roots = {Path(p or ".").resolve() for p in sys.path} - {REPO}
    for name in sorted(names):
        found = [d for d in shipped.get(name, []) if d != OURS]
        found += [str(r / name) for r in sorted(roots) if (r / name).is_dir() or (r / f"{name}.py").is_file()]
        if found:
            out[name] = found
    return out


def test_no_installed_distribution_ships_our_names():
    assert top_level_names() == {"grpo", "grpo_kernels", "scripts", "tests"}
    assert clashes(top_level_names()) == {}


def test_the_clash_finder_finds_a_clash():
    assert "kernels" in clashes({"kernels"}) or hf_kernels_file() is None
    assert clashes({"transformers"})["transformers"][0] == "transformers"


def test_the_wheel_holds_grpo_kernels_and_no_kernels(tmp_path):
    """What a non-editable `pip install .` writes into site-packages: nothing under kernels/."""
    # Built from a copy: setuptools reuses a build/ folder that an earlier build left in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    for name in ("grpo", "kernels"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("grpo_trainer-*.whl")
    files = zipfile.ZipFile(wheel).namelist()
    tops = {f.split("/")[0] for f in files if not f.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"grpo", "grpo_kernels"}
    kernel_files = {Path(f).name for f in files if f.startswith("grpo_kernels/")}
    assert kernel_files == {p.name for p in (REPO / "kernels").glob("*.py")}
    meta = next(f for f in files if f.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(wheel).read(meta).decode()
