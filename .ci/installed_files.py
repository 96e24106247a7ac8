"""After a non-editable `pip install .`: every file of Hugging Face's `kernels` distribution still has the hash
its RECORD gives (nothing of ours was written over it), ours install under grpo/ and grpo_kernels/ only, and
both packages import from site-packages."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import sys
from pathlib import Path


def intact(dist: md.Distribution) -> int:
    checked = 0
    for f in dist.files or []:
        if f.hash is None:  # RECORD lists itself and the .pyc files without a hash
            continue
        digest = hashlib.new(f.hash.mode, Path(dist.locate_file(f)).read_bytes()).digest()
        if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != f.hash.value:
            sys.exit(f"{f} of {dist.metadata['Name']} was changed after it was installed")
        checked += 1
    return checked


ours = {str(f).split("/")[0] for f in md.distribution("grpo-trainer").files}
tops = {t for t in ours if not t.endswith((".dist-info", ".data")) and t not in ("..", "__pycache__")}
assert tops == {"grpo", "grpo_kernels"}, f"grpo-trainer installs {sorted(tops)}"
print(f"HF kernels {md.version('kernels')}: {intact(md.distribution('kernels'))} files intact")

import grpo  # noqa: E402
import grpo_kernels.dispatch  # noqa: E402
import kernels  # noqa: E402

for module in (grpo, grpo_kernels.dispatch, kernels):
    assert "site-packages" in module.__file__, f"{module.__name__} imports from {module.__file__}"
print("grpo, grpo_kernels and HF kernels import from site-packages")
