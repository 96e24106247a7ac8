"""A template renders rows and nothing else: the known Jinja2 escapes to Python's internals are refused in one
line before the model loads, and never run (the shell command they carry leaves no file)."""

from __future__ import annotations

import pytest

from grpo.config import ConfigError, DataTemplate
from grpo.data import build_prompts
from tests.conftest import tiny_template, write_template
from tests.test_checkpoint import train

ESCAPES = {
    "cycler": "{{ cycler.__init__.__globals__.os.system('touch MARK') }}",
    "lipsum": "{{ lipsum.__globals__['os'].popen('touch MARK').read() }}",
    "subclasses": "{% for c in ''.__class__.__mro__[1].__subclasses__() %}"
    "{% if c.__name__ == 'Popen' %}{{ c(['touch', 'MARK']) }}{% endif %}{% endfor %}",
    "self": "{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch MARK') }}",
}


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_an_escape_in_the_instruction_is_refused_and_runs_nothing(name, tiny_model_dir, tmp_path):
    mark = tmp_path / "ran"
    data = tiny_template(tiny_model_dir, tmp_path / "run")
    data["template"] = {"instruction": ESCAPES[name].replace("MARK", str(mark)), "input": "{{question}}"}
    result = train(write_template(tmp_path / "t.yaml", data))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: template.instruction reaches beyond the row it renders (")
    assert last.endswith(
        "a template may use the row's columns, Jinja2's filters and tests, and nothing of Python's internals."
    )
    assert "Loading weights" not in result.stderr
    assert not mark.exists()


def test_the_input_and_output_are_sandboxed_too(tokenizer):
    row = {"question": "What is 1 + 1?", "answer": "2"}
    for part in ("input", "output"):
        tmpl = DataTemplate(**{part: "{{ question.__class__.__mro__ }}"})
        with pytest.raises(ConfigError, match=rf"^template\.{part} reaches beyond the row it renders \("):
            build_prompts([row], tmpl, tokenizer, max_prompt_tokens=512)


def test_a_template_cannot_change_the_row(tokenizer):
    row = {"question": "What is 1 + 1?", "answer": "2", "tags": ["a"]}
    tmpl = DataTemplate(input="{{ tags.append('b') }}{{ question }}")
    with pytest.raises(ConfigError, match=r"^template\.input reaches beyond the row it renders \("):
        build_prompts([row], tmpl, tokenizer, max_prompt_tokens=512)
    assert row["tags"] == ["a"]


def test_plain_templates_render_as_before(tokenizer):
    row = {"question": "What is 1 + 1?", "answer": "#### 2", "n": 3}
    tmpl = DataTemplate(
        instruction="Answer {{ n * 2 }} ways. {{ question | upper }}",
        input="{{question}}",
        output="{{answer}}",
    )
    (prompt,) = build_prompts([row], tmpl, tokenizer, max_prompt_tokens=512)
    assert prompt.messages[0] == {"role": "system", "content": "Answer 6 ways. WHAT IS 1 + 1?"}
    assert prompt.messages[1] == {"role": "user", "content": "What is 1 + 1?"}
    assert prompt.reference == "2"
