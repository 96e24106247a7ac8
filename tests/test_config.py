"""Template loading, overrides and the one-sentence errors for each kind of mistake."""

import pytest

from grpo.config import (
    ConfigError,
    apply_overrides,
    field_docs,
    load_template,
    parse_override,
    template_from_dict,
)
from tests.conftest import write_template


def test_defaults_are_valid_and_documented():
    t = template_from_dict({})
    assert t.config.num_generations == 4 and t.config.beta == 0.0 and t.dataset.path == "builtin:arithmetic"
    docs = {name: text for name, _, text in field_docs()}
    assert all(docs.values()), [k for k, v in docs.items() if not v]
    assert "config.learning_rate_schedule" in docs and "dataset.path" in docs and "model" in docs


def test_overrides_bare_dotted_and_yaml_values(tmp_path):
    path = write_template(tmp_path / "t.yaml", {"name": "x", "config": {"max_steps": 5}})
    t = load_template(
        path,
        [
            "max_steps=2",
            "dataset.path=builtin:arithmetic",
            "rewards=[correctness, soft_format]",
            "gpu_ids=[0,1]",
            "learning_rate=1e-5",
            "use_lora=true",
            "epsilon_high=null",
            "split=test",
            "name=renamed",
        ],
    )
    c = t.config
    assert c.max_steps == 2 and c.rewards == ["correctness", "soft_format"] and c.gpu_ids == [0, 1]
    assert c.learning_rate == 1e-5 and c.use_lora is True and c.epsilon_high is None
    assert t.dataset.split == "test" and t.name == "renamed"


def test_override_values_that_are_not_yaml_stay_strings(tmp_path):
    path = write_template(tmp_path / "t.yaml", {})
    assert load_template(path, ["input={{question}}!"]).template.input == "{{question}}!"
    with pytest.raises(ConfigError, match=r"^config.rewards = '\[a' is not allowed: expected a list.$"):
        load_template(path, ["rewards=[a"])


def test_override_does_not_mutate_input():
    data = {"config": {"max_steps": 5}}
    apply_overrides(data, ["max_steps=1"])
    assert data == {"config": {"max_steps": 5}}


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "max_step=3",
            "Unknown field 'max_step' in override 'max_step=3' (did you mean 'config.max_steps'?).",
        ),
        ("max_steps", "Override 'max_steps' must look like key=value (for example max_steps=2)."),
    ],
)
def test_override_errors(override, message):
    with pytest.raises(ConfigError) as e:
        parse_override(override)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"config": {"lerning_rate": 1}},
            "Unknown field 'config.lerning_rate' (did you mean 'learning_rate'?).",
        ),
        ({"modle": "x"}, "Unknown field 'modle' (did you mean 'model'?)."),
        ({"config": {"batch_size": 0}}, "config.batch_size = 0 is not allowed: it must be at least 1."),
        ({"config": {"batch_size": "8"}}, "config.batch_size = '8' is not allowed: expected an integer."),
        ({"config": {"temperature": "hot"}}, "config.temperature = 'hot' is not allowed: expected a number."),
        (
            {"config": {"learning_rate_schedule": "step"}},
            "config.learning_rate_schedule = 'step' is not allowed: expected one of 'constant', 'linear', 'cosine', "
            "'constant_with_warmup'.",
        ),
        (
            {"config": {"gpu_ids": "x"}},
            "config.gpu_ids = 'x' is not allowed: expected one of 'auto' or a list.",
        ),
        (
            {"config": {"num_generations": 1}},
            "config.num_generations = 1 is not allowed: GRPO needs at least 2 generations per prompt to compare them.",
        ),
        (
            {"config": {"num_generations": 0}},
            "config.num_generations = 0 is not allowed: GRPO needs at least 2 generations per prompt to compare them.",
        ),
        ({"config": {"top_p": 1.5}}, "config.top_p = 1.5 is not allowed: it must be in (0, 1]."),
        ({"config": {"top_p": 0}}, "config.top_p = 0.0 is not allowed: it must be in (0, 1]."),
        (
            {"config": {"warmup_ratio": 1.0}},
            "config.warmup_ratio = 1.0 is not allowed: it must be in [0, 1).",
        ),
        ({"dataset": {"limit": 0}}, "dataset.limit = 0 is not allowed: use null or a positive count."),
        ({"name": " "}, "name = ' ' is not allowed: give the template a name."),
        (
            {"config": {"gpu_ids": []}},
            "config.gpu_ids = [] is not allowed: use auto or a non-empty list of GPU indices.",
        ),
        (
            {"config": {"entropy_coef": -0.01}},
            "config.entropy_coef = -0.01 is not allowed: it must be 0 (off) or more.",
        ),
        (
            {"config": {"kl_estimator": "k1"}},
            "config.kl_estimator = 'k1' is not allowed: expected one of 'k3', 'k2'.",
        ),
        (
            {"config": {"delta": 1.1}},
            "config.delta = 1.1 is not allowed: it must be null or at least 1 + epsilon_high (1.2).",
        ),
        (
            {"config": {"delta": 2.0, "loss_type": "cispo"}},
            "config.delta = 2.0 is not allowed: it caps the unclipped ratio of the clipped objective, and cispo's "
            "objective is CISPO's ratio weight, capped at 1 + epsilon_high and held constant.",
        ),
        ({"config": {"top_k": -1}}, "config.top_k = -1 is not allowed: it must be 0 (no limit) or more."),
        (
            {"config": {"reward_timeout": -1}},
            "config.reward_timeout = -1.0 is not allowed: it must be 0 (no limit) or at most 604800 seconds (a week).",
        ),
        (
            {"dataset": {"missing_columns": "skip"}},
            "dataset.missing_columns = 'skip' is not allowed: expected one of 'error', 'drop'.",
        ),
        ({"config": {"min_p": 1.5}}, "config.min_p = 1.5 is not allowed: it must be in [0, 1]."),
        (
            {"config": {"rollout_is_cap": 0.5}},
            "config.rollout_is_cap = 0.5 is not allowed: it must be 0 (off) or at least 1.",
        ),
        (
            {"config": {"maximum_completion_length": 512, "maximum_sequence_length": 256}},
            "config.maximum_completion_length = 512 is not allowed: it must be below maximum_sequence_length (256).",
        ),
        ({"config": {"max_steps": 0}}, "config.max_steps = 0 is not allowed: use -1 or a positive count."),
        ({"config": {"use_lora": "yes"}}, "config.use_lora = 'yes' is not allowed: expected true or false."),
        ({"config": 3}, "config must be a mapping of fields, got 3."),
        ({"model": "./no/such/model"}, "model = './no/such/model': no such file or folder."),
        ({"dataset": {"path": "/no/such/file.jsonl"}}, "dataset.path = '/no/such/file.jsonl': no such file."),
        # Values that passed every comparison once (inf, nan) or failed only deep inside a run
        (
            {"config": {"learning_rate": float("inf")}},
            "config.learning_rate = inf is not allowed: it must be a finite number.",
        ),
        ({"config": {"beta": float("nan")}}, "config.beta = nan is not allowed: it must be a finite number."),
        (
            {"config": {"reward_timeout": float("inf")}},
            "config.reward_timeout = inf is not allowed: it must be a finite number.",
        ),
        (
            {"config": {"reward_timeout": 1e10}},
            "config.reward_timeout = 10000000000.0 is not allowed: it must be 0 (no limit) or at most 604800 "
            "seconds (a week).",
        ),
        (
            {"config": {"tool_timeout": 1e10}},
            "config.tool_timeout = 10000000000.0 is not allowed: it must be positive and at most 604800 seconds "
            "(a week).",
        ),
        (
            {"config": {"seed": 10**23}},
            "config.seed = 100000000000000000000000 is not allowed: it must be in [0, 2**63), the range every "
            "generator seeded from it takes.",
        ),
        ({"config": {"lora_alpha": -16}}, "config.lora_alpha = -16.0 is not allowed: it must be positive."),
        (
            {"config": {"maximum_sequence_length": 10**11}},
            "config.maximum_sequence_length = 100000000000 is not allowed: it must be in [1, 1048576].",
        ),
        (
            {"config": {"vllm_mode": "server", "vllm_server_url": "http://127.0.0.1:8000"}},
            "config.vllm_mode = 'server' is not allowed: it sets up the vLLM engine, and rollout_engine is torch; "
            "set rollout_engine: vllm.",
        ),
        (
            {"config": {"vllm_server_url": "http://127.0.0.1:8000"}},
            "config.vllm_server_url = 'http://127.0.0.1:8000' is not allowed: it sets up the vLLM engine, and "
            "rollout_engine is torch; set rollout_engine: vllm.",
        ),
        (
            {"config": {"use_adaptive_entropy": True, "entropy_coef_min": 0.5, "entropy_coef_max": 0.1}},
            "config.entropy_coef_min = 0.5 is not allowed: it must be at most entropy_coef_max (0.1).",
        ),
        (
            {"config": {"use_adaptive_entropy": True, "entropy_coef": 2.0}},
            "config.entropy_coef = 2.0 is not allowed: the adaptive coefficient starts there, so it must be in "
            "[entropy_coef_min, entropy_coef_max] = [0, 1].",
        ),
    ],
)
def test_template_errors(data, message):
    with pytest.raises(ConfigError) as e:
        template_from_dict(data)
    assert str(e.value) == message


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^Template file '/no/such.yaml' does not exist.$"):
        load_template("/no/such.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nconfig:\n  max_steps: [1\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML at line \d+"):
        load_template(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a YAML mapping, not list."):
        load_template(listed)


def test_shipped_configs_load():
    t = load_template("configs/default.yaml")
    assert t.template.response_prefix == "<reasoning>\n"
    g = load_template("configs/gsm8k.yaml", ["dataset.path=../shared/data/gsm8k/train.jsonl"])
    assert g.template.input == "{{question}}" and g.config.start_answer_string == "<answer>"
    lora = load_template("configs/lora.yaml")
    assert (
        lora.config.use_lora and lora.config.export_merged and lora.config.adaptor_name == "arithmetic-lora"
    )


def test_every_bounded_number_declares_its_range_next_to_it():
    """A numeric field without a declared check would accept any value; the exceptions are listed on purpose."""
    from grpo.config import LEAF_PATHS
    from grpo.config.schema import leaf_field

    unbounded = {"config.delta"}  # its bound is a relation (checks.py)
    unchecked = [
        dotted
        for dotted in LEAF_PATHS
        if leaf_field(dotted).type in ("int", "float", "float | None", "int | None")
        and leaf_field(dotted).metadata["check"] is None
        and dotted not in unbounded
    ]
    assert unchecked == []


def test_resume_safe_fields_are_marked_in_the_schema():
    from grpo.config import RESUME_SAFE_FIELDS

    assert "config.eval_steps" in RESUME_SAFE_FIELDS and "config.micro_batch_size" in RESUME_SAFE_FIELDS
    assert "config.learning_rate" not in RESUME_SAFE_FIELDS and "config.batch_size" not in RESUME_SAFE_FIELDS
    assert (
        "config.reward_timeout" in RESUME_SAFE_FIELDS and "dataset.missing_columns" not in RESUME_SAFE_FIELDS
    )
    assert "config.tool_timeout" in RESUME_SAFE_FIELDS and "config.tools" not in RESUME_SAFE_FIELDS
    assert len(RESUME_SAFE_FIELDS) == 37  # + rollout_process, rollout_device, rollout_cpus, rollout_timeout
