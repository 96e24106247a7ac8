"""The README's template reference is generated from the config: a field added without regenerating fails here."""

import re

from scripts.template_reference import markdown
from tests.conftest import REPO


def test_readme_template_reference_is_current():
    readme = (REPO / "README.md").read_text()
    assert markdown() in readme, "run: python scripts/template_reference.py and paste it into README.md"


def test_readme_commands_name_real_files():
    readme = (REPO / "README.md").read_text()
    for path in set(re.findall(r"(?:configs|scripts|docs|kernels)/[\w./-]+\.(?:yaml|py|md)", readme)):
        assert (REPO / path).is_file(), path
