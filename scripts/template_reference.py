"""Print the template reference (every field, its default and its doc) as a Markdown table for the README."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grpo.config import field_docs  # noqa: E402


def markdown() -> str:
    lines = ["| field | default | meaning |", "| --- | --- | --- |"]
    for name, default, text in field_docs():
        default = default.replace("\n", "\\n").replace("|", "\\|")
        if len(default) > 40:
            default = default[:37] + "..."
        lines.append(f"| `{name}` | `{default}` | {text.replace('|', '/')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
