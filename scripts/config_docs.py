"""Print the template reference (every field, its default and its doc) as a Markdown table.

The table is the section "Every field" of docs/configuration.md, where tests/test_readme.py checks that it matches
the config. After adding or changing a field, regenerate it in place:

    python scripts/config_docs.py --write
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grpo.config import field_docs  # noqa: E402

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
HEADER = "| field | default | meaning |"


def markdown() -> str:
    lines = [HEADER, "| --- | --- | --- |"]
    for name, default, text in field_docs():
        default = default.replace("\n", "\\n").replace("|", "\\|")
        if len(default) > 40:
            default = default[:37] + "..."
        lines.append(f"| `{name}` | `{default}` | {text.replace('|', '/')} |")
    return "\n".join(lines)


def table_in(page: str) -> str:
    """The page's template reference: the table that starts with HEADER, up to its first non-table line."""
    lines = page.splitlines()
    if HEADER not in lines:
        return ""
    start = lines.index(HEADER)
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[start:end])


def write(page: Path = PAGE) -> None:
    text = page.read_text()
    old = table_in(text)
    if not old:
        raise SystemExit(f"error: {page} has no table starting with {HEADER!r}.")
    page.write_text(text.replace(old, markdown()))


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    else:
        print(markdown())
