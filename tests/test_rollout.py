"""Sampling with a shared prompt prefix: padding, end tokens, masks, and agreement with the log-prob pass."""

import json

import pytest
import torch

from grpo.model.loading import load_model
from grpo.model.logprobs import CompletionLogprobs
from grpo.rollout.decoding.sampling import sample_next
from grpo.rollout.generate import Rollout, SamplingSettings, generate, left_pad


def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), device=torch.device("cpu"), dtype=torch.float32)


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_rows_take_whole_groups():
    n, t = 6, 3  # 3 prompts x G=2
    ro = Rollout(
        prompt_ids=torch.arange(n * 2).view(n, 2),
        prompt_mask=torch.ones(n, 2, dtype=torch.long),
        completion_ids=torch.arange(n * t).view(n, t),
        completion_mask=torch.ones(n, t, dtype=torch.long),
        truncated=torch.tensor([True, False] * 3),
        group_size=2,
        sampling_logps=-torch.arange(n * t, dtype=torch.float).view(n, t),
    )
    part = ro.rows(slice(2, 6))
    assert part.group_size == 2 and part.completion_ids.tolist() == ro.completion_ids[2:6].tolist()
    assert part.sampling_logps.tolist() == ro.sampling_logps[2:6].tolist()
    assert part.prompt_ids.tolist() == [[4, 5], [6, 7], [8, 9], [10, 11]]
    assert part.truncated.tolist() == [True, False] * 2
    ids, _, index = part.prompt_groups(slice(0, 4))  # the shared-prefix pass sees its 2 prompts
    assert ids.tolist() == [[4, 5], [8, 9]] and index.tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match=r"^rows 1:4 split a group of 2 samples.$"):
        ro.rows(slice(1, 4))


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, temperature=1.0, top_p=0.5, generator=g)) for _ in range(50)}
    assert draws == {0}
    draws = {int(sample_next(logits, temperature=1.0, top_p=0.85, generator=g)) for _ in range(200)}
    assert draws == {0, 1}


def test_greedy_rollout_matches_unpadded_single_prompt(tiny_model_dir, tokenizer):
    """Left padding and the G-fold cache expansion must not change what a prompt produces."""
    model = tiny(tiny_model_dir)
    short = tokenizer("What is 2 + 2?", add_special_tokens=False)["input_ids"]
    long = tokenizer("A much longer prompt that forces padding of the short one", add_special_tokens=False)[
        "input_ids"
    ]
    settings = SamplingSettings(max_new_tokens=6, end_ids=(tokenizer.eos_token_id,), temperature=1e-4)
    both = generate(model, [short, long], settings, num_generations=3, pad_id=tokenizer.pad_token_id)
    alone = generate(model, [short], settings, num_generations=1, pad_id=tokenizer.pad_token_id)
    assert both.completion_ids.shape == (6, 6)
    for j in range(3):
        assert torch.equal(both.completion_ids[j], alone.completion_ids[0])


def test_end_token_masks_the_rest(tiny_model_dir, tokenizer):
    model = tiny(tiny_model_dir)
    prompt = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    g = torch.Generator().manual_seed(0)
    # Declare the most likely first token to be an end token: sequences that draw it end at once.
    first = model(torch.tensor([prompt])).logits[0, -1].argmax().item()
    ro = generate(
        model,
        [prompt],
        SamplingSettings(max_new_tokens=5, end_ids=(first,), temperature=1.0),
        num_generations=8,
        pad_id=0,
        generator=g,
    )
    for ids, mask, trunc in zip(ro.completion_ids, ro.completion_mask, ro.truncated):
        ended = (ids == first).nonzero()
        if len(ended):
            k = int(ended[0])
            assert mask.tolist() == [1] * (k + 1) + [0] * (len(mask) - k - 1) and not trunc
            assert torch.all(ids[k + 1 :] == 0)
        else:
            assert mask.sum() == len(mask) and trunc


def test_logprob_pass_matches_sampling_distribution(tiny_model_dir, tokenizer):
    """The training forward over prompt + completion gives the log-probs the sampler used (no off-by-one)."""
    model = tiny(tiny_model_dir)
    prompts = [
        tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("Hi there", "Count to ten please")
    ]
    ro = generate(
        model,
        prompts,
        SamplingSettings(max_new_tokens=4, end_ids=(tokenizer.eos_token_id,)),
        num_generations=2,
        pad_id=tokenizer.pad_token_id,
        generator=torch.Generator().manual_seed(1),
    )
    with torch.no_grad():
        logps = CompletionLogprobs(model, impl="naive")(
            ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask
        )
    for i in range(4):
        ids = ro.prompt_ids[i][ro.prompt_mask[i].bool()].tolist()
        for t in range(int(ro.completion_mask[i].sum())):
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1]
            expected = torch.log_softmax(logits, -1)[ro.completion_ids[i, t]]
            assert abs(float(logps[i, t]) - float(expected)) < 1e-4
            ids.append(int(ro.completion_ids[i, t]))


# ---------------------------------------------------------------- the sampler contract and the registry
def test_settings_from_the_config():
    from grpo.config import template_from_dict

    c = template_from_dict(
        {"config": {"temperature": 0.7, "top_k": 5, "maximum_completion_length": 9}}
    ).config
    settings = SamplingSettings.from_config(c, [2, 7])
    assert settings == SamplingSettings(
        max_new_tokens=9, end_ids=(2, 7), temperature=0.7, top_p=1.0, top_k=5, min_p=0.0, greedy=False
    )
    with pytest.raises(AttributeError):
        settings.temperature = 1.0  # frozen: one value shared by a step, its turns and its evaluation


def test_our_sampler_draws_what_generate_draws_and_refuses_other_steps(tiny_model_dir, tokenizer):
    from grpo.rollout.decoding.torch_sampler import TorchSampler

    model = tiny(tiny_model_dir)
    settings = SamplingSettings(max_new_tokens=5, end_ids=(tokenizer.eos_token_id,))
    sampler = TorchSampler(model, pad_id=tokenizer.pad_token_id, version=3)
    got = sampler.sample(
        [[5, 6, 7]], settings, num_generations=2, generator=torch.Generator().manual_seed(1), version=3
    )
    want = generate(model, [[5, 6, 7]], settings, num_generations=2, pad_id=tokenizer.pad_token_id,
                    generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert torch.equal(got.completion_ids, want.completion_ids)
    assert torch.equal(got.sampling_logps, want.sampling_logps)
    with pytest.raises(RuntimeError) as e:
        sampler.sample([[5]], settings, num_generations=1, generator=None, version=4)
    assert str(e.value) == (
        "our decoder holds the weights of step 3, not those of step 4: update its weights after every "
        "optimizer step"
    )
    sampler.update_weights(model, version=4)
    assert sampler.version == 4


def test_nested_gathers_gather_once(monkeypatch, tiny_model_dir):
    """A rollout of several turns (or an evaluation's chunks) inside one gathered block gathers once: under
    FSDP every rank must take part in each gather, and the ranks run different numbers of turns."""
    import contextlib

    from grpo.rollout.decoding import torch_sampler

    gathers = []

    @contextlib.contextmanager
    def counted(policy):
        gathers.append(policy)
        yield

    monkeypatch.setattr(torch_sampler, "full_params", counted)
    model = tiny(tiny_model_dir)
    sampler = torch_sampler.TorchSampler(model, pad_id=0)
    settings = SamplingSettings(max_new_tokens=2, end_ids=(), greedy=True)
    with sampler.gathered():
        for _ in range(3):
            sampler.sample([[5, 6]], settings, num_generations=1, generator=None, version=0)
    assert gathers == [model]
    sampler.sample([[5, 6]], settings, num_generations=1, generator=None, version=0)  # alone: its own gather
    assert gathers == [model, model]


def config_with(**fields):
    from grpo.config import template_from_dict

    return template_from_dict({"config": fields}).config


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"rollout_engine": "sglang"}, "config.rollout_engine = 'sglang' names no sampler: use one of torch, vllm."),
        ({"rollout_engine": "vllm", "vllm_mode": "remote"},
         "config.vllm_mode = 'remote' names no sampler: use one of colocate, server."),
    ],
)  # fmt: skip
def test_a_name_without_a_sampler_is_refused_in_one_sentence(fields, message):
    from dataclasses import replace

    from grpo.config import ConfigError
    from grpo.rollout.registry import check_sampler

    c = replace(
        config_with(), **fields
    )  # past the template's own check, as a registry entry left out would be
    with pytest.raises(ConfigError) as e:
        check_sampler(c, torch.device("cpu"), 1)
    assert str(e.value) == message


def test_the_config_and_the_registry_name_the_same_engines():
    import typing

    from grpo.config.rollout_settings import RolloutSettings
    from grpo.rollout.samplers import SAMPLERS

    hints = typing.get_type_hints(RolloutSettings)
    assert set(typing.get_args(hints["rollout_engine"])) == {n.partition("/")[0] for n in SAMPLERS}
    modes = {n.partition("/")[2] for n in SAMPLERS if n.startswith("vllm/")}
    assert set(typing.get_args(hints["vllm_mode"])) == modes


def test_vllm_is_imported_only_when_chosen():
    import subprocess
    import sys

    from tests.conftest import REPO

    code = (
        "import sys, torch\n"
        "from grpo.config import template_from_dict\n"
        "from grpo.rollout.registry import check_sampler, sampler_class\n"
        "c = template_from_dict({}).config\n"
        "check_sampler(c, torch.device('cpu'), 1)\n"
        "print(sampler_class(c).__name__, sorted(m for m in sys.modules if 'vllm' in m))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout == "TorchSampler []\n"


class Echo:
    """A throw-away sampler, registered by the test below: every completion is its prompt's last token."""

    calls: list = []

    def __init__(self, pad_id, version):
        self.pad_id, self.version, self.startup_s, self.push_s = pad_id, version, 0.0, 0.0

    @classmethod
    def problem(cls, c, *, device, world_size):
        return None

    @classmethod
    def connect(cls, template, *, output_dir, env):
        return None

    @classmethod
    def start(cls, template, *, pad_id, version, **_):
        return cls(pad_id, version)

    def sample(self, prompts, settings, *, num_generations, generator, version):
        Echo.calls.append((len(prompts), settings.max_new_tokens, num_generations, version))
        ids, mask = left_pad(prompts, self.pad_id, torch.device("cpu"))
        last = ids[:, -1:].repeat_interleave(num_generations, dim=0)
        return Rollout(
            prompt_ids=ids.repeat_interleave(num_generations, dim=0),
            prompt_mask=mask.repeat_interleave(num_generations, dim=0),
            completion_ids=last,
            completion_mask=torch.ones_like(last),
            truncated=torch.ones(len(last), dtype=torch.bool),
            group_size=num_generations,
            sampling_logps=torch.full(last.shape, -1.0),
        )

    def update_weights(self, model, *, version):
        self.version = version

    def gathered(self):
        import contextlib

        return contextlib.nullcontext()

    def close(self):
        Echo.calls.append("closed")


def test_a_registered_sampler_is_picked_and_called_as_ours(monkeypatch, tiny_model_dir, tmp_path):
    from dataclasses import replace

    from grpo.config import template_from_dict
    from grpo.rollout import registry
    from grpo.trainer import GRPOTrainer
    from tests.conftest import tiny_template

    monkeypatch.setitem(registry.SAMPLERS, "echo", "tests.test_rollout:Echo")
    monkeypatch.setattr(Echo, "calls", [])
    template = template_from_dict(tiny_template(tiny_model_dir, tmp_path, eval_steps=2, eval_limit=2))
    template = replace(template, config=replace(template.config, rollout_engine="echo"))
    trainer = GRPOTrainer(template)
    assert isinstance(trainer.rollout_sampler, Echo) and trainer.sampling.sampler is trainer.rollout_sampler
    trainer.train()
    # two steps of 2 prompts x G=2 at versions 0 and 1, the evaluation at step 2 greedy on 2 prompts, the close
    assert Echo.calls == [(2, 8, 2, 0), (2, 8, 2, 1), (2, 8, 1, 2), "closed"]
    assert json.loads((tmp_path / "eval.json").read_text())["step"] == 2  # scored like our decoder's answers
