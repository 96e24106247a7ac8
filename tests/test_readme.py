"""The README is a short front page and docs/ holds one topic per page: both must stay true to the repository."""

import re
from pathlib import Path

from scripts.config_docs import markdown, table_in
from tests.conftest import REPO

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS, REPO / "kernels" / "BENCHMARKS.md"]
MAX_README_LINES = 250

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Paths the pages name in prose and commands, relative to the repository root.
PATH = re.compile(r"(?:grpo|configs|scripts|docs|kernels|tests)/[\w./-]+\.(?:yaml|py|md|sh)")
# The pages describe the project as it is; how it got there lives in git.
NARRATION = re.compile(
    r"\bsessions?\b|\bdevice tool\b|\blent\b|\bborrowed\b|\bwent from\b|\bbefore the change\b",
    re.I,
)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (not - and _), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def test_config_docs_in_docs_is_current():
    page = (REPO / "docs" / "configuration.md").read_text()
    assert table_in(page) == markdown(), "run: python scripts/config_docs.py --write"


def test_readme_is_a_short_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_first_bash_block_is_the_main_command():
    # CI runs the first ```bash block of the README, appending max_steps=2 output_dir=... to its train command
    block = re.search(r"^```bash\n(.*?)^```", README.read_text(), re.S | re.M)
    assert block, "README.md has no ```bash block"
    commands = block.group(1).strip().splitlines()
    assert commands[-1].endswith("scripts/train.py configs/default.yaml"), commands


def test_readme_links_every_docs_page():
    links = {Path(target.split("#")[0]) for target in LINK.findall(README.read_text())}
    missing = [page.name for page in DOCS if Path("docs") / page.name not in links]
    assert not missing, f"README.md's table of docs pages lacks: {missing}"


def test_relative_links_point_at_real_files_and_headings():
    broken = []
    for page in PAGES:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_pages_name_real_files():
    missing = []
    for page in PAGES:
        for path in set(PATH.findall(page.read_text())):
            if not (REPO / path).is_file():
                missing.append(f"{page.name}: {path}")
    assert not missing, missing


def test_pages_describe_the_project_not_its_history():
    found = []
    for page in PAGES:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if m := NARRATION.search(line):
                found.append(f"{page.name}:{number}: {m.group(0)!r}")
    assert not found, found


def test_narration_markers_leave_ordinary_words_alone():
    ordinary = "possession obsessions silent excellent lentils borrowing went fromage the change log"
    assert not NARRATION.search(ordinary)
    assert NARRATION.search("A later session measured it") and NARRATION.search("the device tool")
