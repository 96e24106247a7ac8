"""Environments that misbehave never give a traceback or hang the run: a step that raises, returns the wrong type,
never returns or ends its process answers the model with an "Error: ..." observation (the other episodes are
replayed in the fresh worker); a reset that fails stops the run with one line naming the environment; and a run
whose environment hangs in every step still stops on SIGTERM to its process group, as `grpo stop` sends it.

The environments live in a small module written to a temporary folder; their worker is a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from grpo.config import ConfigError
from grpo.data import Prompt
from grpo.rollout.turns.multi_turn import MultiTurn
from tests.conftest import REPO, tiny_template, write_template
from tests.test_multi_turn import config, play_turns, scripted
from tests.test_multi_turn_runs import ending_model_dir  # noqa: F401  (a fixture: a model that ends replies)

HOSTILE = '''
import os
import random
from pathlib import Path


class Mute(Exception):
    def __str__(self):
        raise ValueError("no message")


def spin():
    while True:  # holds the interpreter: no thread could end this
        pass


class Moody:
    """Counts the replies down from the row's start; a reply (or the row) names a misbehaviour."""

    def reset(self, row):
        if row.get("reset") == "raise":
            raise KeyError("start")
        if row.get("reset") == "number":
            return 7
        if row.get("reset") == "hang":
            spin()
        self.left = int(row["start"])
        return None

    def step(self, reply):
        self.left -= 1
        if "raise" in reply:
            raise ValueError(f"cannot read {reply!r}")
        if "mute" in reply:
            raise Mute()
        if "number" in reply:
            return 5
        if "triple" in reply:
            return "a", False, 1
        if "int observation" in reply:
            return 5, False
        if "hang" in reply:
            spin()
        if "exit" in reply:
            os._exit(3)
        return (None, True) if self.left == 0 else (f"{self.left} left", False)


class Drifting:
    """Not a function of its row and replies: a replay after a timeout cannot rebuild it."""

    def reset(self, row):
        self.draw = random.random()

    def step(self, reply):
        if "hang" in reply:
            spin()
        return f"{self.draw}", False


class Stuck:
    """Every step hangs; each notes its worker's pid first, so a test can check that none outlives the run."""

    def reset(self, row):
        return None

    def step(self, reply):
        folder = Path(os.environ["STUCK_PIDS"])
        (folder / f"{os.getpid()}").write_text("")
        spin()
'''


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "hostile_environments.py").write_text(textwrap.dedent(HOSTILE))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(folder))
        yield folder


def play(tokenizer, tmp_path, cls, rows, policy, *, g=2, steps=10):
    c = config(tmp_path, environment=f"hostile_environments:{cls}", num_generations=g, tool_timeout=0.5,
               max_tool_calling_iterations=steps, maximum_completion_length=200)  # fmt: skip
    turns = MultiTurn(c)
    sampler = scripted(tokenizer, policy)
    prompts = []
    for i, row in enumerate(rows):
        messages = [{"role": "user", "content": f"Play game {i}."}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts.append(Prompt(text=text, ids=ids, reference="", row=row, messages=messages))
    return turns, play_turns(turns, sampler, prompts, c, tokenizer)


def nth_reply(replies):
    return lambda text, k: replies[text.count("<|im_start|>assistant") - 1]


def observations(conversation):
    return [m["content"] for m in conversation.messages[1:] if m["role"] == "user"]


def test_a_step_that_raises_or_returns_the_wrong_type_is_an_error_observation(
    tokenizer, tmp_path, hostile_folder
):
    replies = ["raise", "mute", "number", "triple", "int observation", "go", "go", "go", "go"]
    _, ro = play(tokenizer, tmp_path, "Moody", [{"start": 9}], nth_reply(replies))
    assert observations(ro.conversations[0]) == observations(ro.conversations[1])
    conv = ro.conversations[0]
    assert observations(conv) == [
        "Error: the environment's step raised ValueError: cannot read 'raise'",
        "Error: the environment's step raised Mute (its message cannot be shown)",
        "Error: the environment's step returned int, not (observation | None, done)",
        "Error: the environment's step returned a tuple of str, bool, int, not (observation | None, done)",
        "Error: the environment's step returned a tuple of int, bool, not (observation | None, done)",
        "3 left",
        "2 left",
        "1 left",
    ]  # every call counted down, the failing ones too
    assert (conv.replies, conv.cut) == (replies, None)


def test_a_step_that_hangs_or_dies_is_cut_and_the_other_episodes_replayed(
    tokenizer, tmp_path, hostile_folder
):
    # the first turn: sample 0 of game 0 hangs, sample 0 of game 1 ends its process, the others count down
    def policy(text, k):
        if text.count("<|im_start|>assistant") > 1 or k == 1:
            return "go"
        return "hang" if "game 0" in text else "exit"

    start = time.perf_counter()
    turns, ro = play(tokenizer, tmp_path, "Moody", [{"start": 2}, {"start": 3}], policy, g=2)
    assert time.perf_counter() - start < 20
    assert [observations(conv) for conv in ro.conversations] == [
        ["Error: the environment's step did not return within 0.5 s", "1 left"],
        ["1 left"],
        ["Error: the environment's step ended its process (exit code 3)", "2 left", "1 left"],
        ["2 left", "1 left"],
    ]  # the replayed episodes went on where they were: sample 1 ends on its second "go"
    assert [conv.cut for conv in ro.conversations] == [None] * 4
    assert turns.episodes.worker.starts == 3  # the first, and one after each lost worker


def test_an_environment_that_a_replay_cannot_rebuild_stops_the_run_in_one_line(
    tokenizer, tmp_path, hostile_folder
):
    with pytest.raises(ConfigError) as e:
        play(tokenizer, tmp_path, "Drifting", [{}], lambda text, k: "go" if k == 0 else "hang")
    assert str(e.value) == (
        "config.environment = 'hostile_environments:Drifting': replayed after a step that timed out or ended its "
        "worker, an episode gave other answers; an environment must be a function of its row and the replies."
    )


@pytest.mark.parametrize(
    "row, message",
    [
        ({"reset": "raise"}, "reset raised KeyError: 'start'."),
        ({"reset": "number"}, "reset returned int, not str | None."),
        ({"reset": "hang"}, "reset did not return within 0.5 s (tool_timeout)."),
        ({"start": 1, "extra": lambda: 0}, "reset cannot be handed its row (PicklingError: Can't pickle <function "
                                           "<lambda> at 0x0>: attribute lookup <lambda> on tests.test_environment_safety "
                                           "failed)."),
    ],
)  # fmt: skip
def test_a_reset_that_fails_stops_the_run_in_one_line_naming_the_environment(
    tokenizer, tmp_path, hostile_folder, row, message
):
    with pytest.raises(ConfigError) as e:
        play(tokenizer, tmp_path, "Moody", [row], lambda text, k: "go")
    if "extra" in row:
        message = message.replace("0x0", hex(id(row["extra"])))
    assert str(e.value) == f"config.environment = 'hostile_environments:Moody': {message}"


def test_a_run_whose_environment_hangs_in_every_step_stops_on_sigterm(
    ending_model_dir,  # noqa: F811  (the fixture imported above)
    hostile_folder,
    tmp_path,
):
    pids = tmp_path / "pids"
    pids.mkdir()
    out = tmp_path / "run"
    data = tiny_template(ending_model_dir, out, environment="hostile_environments:Stuck", tool_timeout=0.5,
                         max_steps=50, max_tool_calling_iterations=2, maximum_completion_length=24,
                         maximum_sequence_length=400, rewards=["tests.user_rewards:length"])  # fmt: skip
    path = write_template(tmp_path / "stuck.yaml", data)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{hostile_folder}", "OMP_NUM_THREADS": "1",
           "STUCK_PIDS": str(pids)}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "scripts/train.py", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not any(pids.iterdir()) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        os.killpg(proc.pid, signal.SIGTERM)  # as `grpo stop` does: the trainer and its workers
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert "Stopped at step 1; model saved to" in stdout + stderr
    assert (out / "model" / "model.safetensors").is_file()
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert [m["content"] for m in sample["turns"]["messages"] if m["role"] == "user"][0] == (
        "Error: the environment's step did not return within 0.5 s"
    )
    for pid in pids.iterdir():  # every worker that hung was killed, none outlives the run
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid.name), 0)
