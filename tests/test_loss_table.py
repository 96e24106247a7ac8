"""The loss table (grpo/config/loss_table.py) is the one place a variant is stated: the template's fields, the
options the loss receives, the lists of loss types in messages and docs all follow from it."""

import dataclasses
import re
import subprocess
import sys

import pytest
import torch

from grpo.config import ConfigError, TrainConfig, template_from_dict
from grpo.config.loss_table import (
    OPTION_CLASSES,
    OPTION_FIELDS,
    REDUCTIONS,
    TERMS,
    VARIANTS,
    ClipOptions,
    KlOptions,
    SapoOptions,
    VespoOptions,
)
from grpo.config.schema import leaf_field
from grpo.loss import policy_loss, token_terms
from grpo.loss_choice import LossChoice, loss_options, loss_table_markdown, resolve_loss
from tests.conftest import REPO

NAMES = list(VARIANTS)


def test_the_table_lists_every_built_in_once_in_order():
    assert NAMES == ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
    assert {v.reduction for v in VARIANTS.values()} == set(REDUCTIONS)
    assert [v.objective.name for v in VARIANTS.values()] == [
        *["clipped"] * 4,
        "cispo",
        "sapo",
        "clipped",
        "vespo",
    ]
    assert OPTION_CLASSES == (KlOptions, ClipOptions, SapoOptions, VespoOptions)


def test_each_option_is_a_template_field_with_its_default_doc_and_check_from_the_table():
    c = TrainConfig()
    for name, f in OPTION_FIELDS.items():
        field = leaf_field(f"config.{name}")
        assert field is f or field.metadata is f.metadata, name  # the very declaration, not a copy
        assert getattr(c, name) == (
            f.default if f.default is not dataclasses.MISSING else f.default_factory()
        )
    assert list(OPTION_FIELDS) == [
        "kl_estimator",
        "use_bias_correction_kl",
        "delta",
        "sapo_temperature_pos",
        "sapo_temperature_neg",
        "vespo_k_pos",
        "vespo_lambda_pos",
        "vespo_k_neg",
        "vespo_lambda_neg",
    ]
    # the defaults as they were before the table, stated once now
    assert (c.sapo_temperature_pos, c.sapo_temperature_neg) == (1.0, 1.05)
    assert (c.vespo_k_pos, c.vespo_lambda_pos, c.vespo_k_neg, c.vespo_lambda_neg) == (2.0, 3.0, 3.0, 2.0)
    assert (c.kl_estimator, c.use_bias_correction_kl, c.delta) == ("k3", False, None)
    assert SapoOptions() == SapoOptions(1.0, 1.05) and VespoOptions().vespo_lambda_neg == 2.0
    with pytest.raises(
        ConfigError, match=r"^config.sapo_temperature_neg = 0.0 is not allowed: it must be positive.$"
    ):
        template_from_dict({"config": {"sapo_temperature_neg": 0}})


def test_the_loss_type_field_and_its_messages_list_the_table():
    help_text = leaf_field("config.loss_type").metadata["doc"]
    assert help_text.startswith("grpo|bnpo|dr_grpo|dapo|cispo|sapo|luspo|vespo or package.module:function")
    allowed = "use one of grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo or package.module:function."
    with pytest.raises(ConfigError) as e:
        template_from_dict({"config": {"loss_type": "ppo"}})
    assert str(e.value) == f"config.loss_type = 'ppo' is not allowed: {allowed}"
    c = TrainConfig(loss_type="ppo")  # built without the template's checks: resolve_loss says the same
    with pytest.raises(ConfigError) as e:
        resolve_loss(c)
    assert str(e.value) == f"config.loss_type = 'ppo' is not allowed: {allowed}"
    with pytest.raises(
        ValueError, match=r"^loss_type = 'ppo' is not allowed: use one of grpo, bnpo, dr_grpo, dapo, "
    ):
        policy_loss(torch.zeros(1, 1), None, None, torch.zeros(1), torch.ones(1, 1), loss_type="ppo")


def test_a_user_loss_is_an_entry_of_the_same_type_and_runs_the_same_path():
    builtin = resolve_loss(TrainConfig(loss_type="dapo"))
    user = resolve_loss(TrainConfig(loss_type="tests.user_losses:terms_global_token_mean"))
    assert type(builtin) is type(user) is LossChoice
    assert type(builtin.variant) is type(user.variant) and builtin.variant is VARIANTS["dapo"]
    assert user.variant.objective is None and user.variant.function.__name__ == "loss"
    assert builtin.reduction == user.reduction == "global_token_mean"


def test_options_reach_only_their_objective_and_unknown_names_are_refused():
    logps, old = torch.tensor([[0.5]]), torch.zeros(1, 1)
    args = (logps, old, None, torch.ones(1), torch.ones(1, 1))
    plain = token_terms(*args, objective="clipped")[0]
    assert torch.equal(token_terms(*args, objective="clipped", sapo_temperature_pos=9.0)[0], plain)
    assert not torch.equal(
        token_terms(*args, objective="sapo", sapo_temperature_pos=9.0)[0],
        token_terms(*args, objective="sapo")[0],
    )
    with pytest.raises(TypeError, match=r"^token_terms\(\) got an unexpected keyword argument 'sapo_temp'$"):
        token_terms(*args, sapo_temp=2.0)
    with pytest.raises(
        ValueError, match=r"^objective = 'ppo' is not allowed: use one of clipped, cispo, sapo, vespo.$"
    ):
        token_terms(*args, objective="ppo")


def test_loss_options_are_the_table_options_set_away_from_their_defaults():
    c = TrainConfig(loss_type="sapo", sapo_temperature_neg=2.0, kl_estimator="k2", beta=0.1)
    assert loss_options(c) == {"kl_estimator": "k2", "sapo_temperature_neg": 2.0}
    assert loss_options(TrainConfig(delta=1.5)) == {"delta": 1.5}


def test_every_variant_has_its_trl_note_where_the_brief_asks():
    notes = {v.name: v.differs_from_trl for v in VARIANTS.values()}
    assert "TRL reduces it as `grpo`" in notes["sapo"]
    assert "1 + `epsilon_high`" in notes["cispo"] and "fold into log W" in notes["vespo"]
    shared = {t.name: t.differs_from_trl for t in TERMS}
    assert "importance_sampling_level: sequence" in shared["the KL term"]
    assert "top-entropy mask" in shared["the entropy bonus"] and "first step" in shared["the entropy bonus"]


def test_docs_show_the_table():
    page = (REPO / "docs" / "losses.md").read_text()
    block = re.search(r"<!-- loss table: start -->\n(.*)\n<!-- loss table: end -->", page, re.S)
    assert block and block.group(1) == loss_table_markdown(), (
        "paste `python -m grpo.loss_choice` into docs/losses.md"
    )
    printed = subprocess.run(
        [sys.executable, "-m", "grpo.loss_choice"], capture_output=True, text=True, cwd=REPO
    )
    assert printed.stdout.strip() == loss_table_markdown()


@pytest.mark.parametrize(
    "page, section",
    [
        ("docs/grpo-explained.md", "## Where the variants change this"),
        ("README.md", ""),
        ("docs/losses.md", "## Loss variants"),
    ],
)
def test_every_page_that_lists_the_loss_types_lists_them_all(page, section):
    text = (REPO / page).read_text()
    text = text[text.index(section) :] if section else text
    missing = [name for name in NAMES if f"`{name}`" not in text]
    assert missing == [], f"{page} does not name {missing}"


def test_reading_a_template_does_not_load_torch():
    code = "import sys, grpo.config; grpo.config.load_template('configs/default.yaml'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "False", out.stderr
