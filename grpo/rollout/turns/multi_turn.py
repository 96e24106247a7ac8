"""Multi-turn rollouts: the model calls tools (config.tools) or acts in an environment (config.environment) over
several turns, and the result is one ordinary `Rollout`.

Each turn is one `Sampler.sample` call (grpo/rollout/sampler.py) over every sample still going, so a sample
that waits for its tool holds up the others by at most one turn. After a reply, the tool results (or the environment's observation) are rendered
with the chat template as the next message(s), and those tokens, with the role headers between turns, are
appended to the sample's completion with `model_written` 0: the sequence keeps them, so the log-probs see the
whole conversation, while the loss, the KL, the entropy and every token count take only what the model sampled
(`Rollout.trained_mask`). A sample stops when its reply calls no tool (or the environment says done), at
`max_tool_calling_iterations` calls (environment steps), or when its model tokens reach
`maximum_completion_length` or the whole sequence `maximum_sequence_length`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from grpo.config import TrainConfig
from grpo.errors import ConfigError
from grpo.rollout.generate import Rollout, SamplingSettings, left_pad
from grpo.rollout.sampler import Sampler
from grpo.rollout.turns.environments import Episodes, resolve_environment
from grpo.rollout.turns.tools import CallFormat, resolve_tools, run_call, tool_message, tools_description

REPLY_END = "\x00reply-end\x00"  # where a reply's text ends in a rendered conversation (between_turns)


@dataclass
class Conversation:
    """One sample's turns: what rewards get as `messages` and `tool_calls`, and samples.jsonl shows."""

    messages: list[dict[str, str]]  # the prompt's messages, then each reply and each tool/user message
    replies: list[str] = field(default_factory=list)  # what the model wrote, one text per turn
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # name, arguments, result, error
    cut: str | None = None  # "calls" or "tokens": stopped by a limit rather than by the model or environment
    prompt_length: int = 0  # how many of `messages` are the prompt's

    def __post_init__(self) -> None:
        self.prompt_length = self.prompt_length or len(self.messages)

    @property
    def text(self) -> str:
        """The completion rewards score: the model's own replies (a tool's output is in `messages`)."""
        return "\n".join(self.replies)


class MultiTurn:
    """The tools or the environment a template names, resolved before any model loads."""

    def __init__(self, c: TrainConfig, prefix: str = ""):
        if c.tools and c.environment:
            raise ConfigError(
                "config.tools and config.environment are both set: a run uses one or the other."
            )
        self.tools = resolve_tools(c.tools) if c.tools else {}
        self.environment = resolve_environment(c.environment) if c.environment else None
        self.episodes = (
            Episodes(self.environment, c.environment, c.tool_timeout) if self.environment else None
        )
        self.call_format = CallFormat.parse(c.tool_call_format)
        self.max_iterations, self.timeout = c.max_tool_calling_iterations, c.tool_timeout
        self.max_sequence_length = c.maximum_sequence_length
        self.max_chars = c.tool_output_chars
        self.prefix = (
            prefix  # template.response_prefix: prefilled in the prompt, the start of the first reply
        )
        self.schemas = [schema for _, schema in self.tools.values()] or None
        self.note: str | None = None  # the run log's line when the tools went into the system prompt

    @classmethod
    def from_config(cls, c: TrainConfig, prefix: str = "") -> MultiTurn | None:
        return cls(c, prefix) if c.tools or c.environment else None

    def system_text(self, tokenizer: Any) -> str:
        """Text for the system prompt: the tools and the call format when the chat template ignores `tools=`
        (SmolLM2's ChatML does); "" when it renders them itself."""
        if not self.schemas:
            return ""
        probe = [{"role": "user", "content": "x"}]
        plain = tokenizer.apply_chat_template(probe, tokenize=False)
        if tokenizer.apply_chat_template(probe, tools=self.schemas, tokenize=False) != plain:
            return ""
        self.note = (
            "The chat template ignores tools: their description and call format are in the system prompt"
        )
        return tools_description(self.schemas, self.call_format)

    def rollout(
        self,
        sampler: Sampler,
        prompts: list[Any],
        settings: SamplingSettings,
        tokenizer: Any,
        generator: torch.Generator | None,
        *,
        num_generations: int,
        version: int,
    ) -> Rollout:
        """G samples of each prompt (objects with .ids, .messages, .row), every turn of all samples batched in
        one call of `sampler`; settings.max_new_tokens bounds the tokens the model writes over all turns."""
        g = num_generations
        samples = [_Sample(p, Conversation(list(p.messages))) for p in prompts for _ in range(g)]
        if self.episodes is not None:
            self._reset(samples, tokenizer, g)
        with sampler.gathered():  # FSDP gathers once: the ranks run different numbers of turns
            device = self._play(sampler, samples, settings, tokenizer, generator, g, version)
        return _as_rollout(samples, g, tokenizer.pad_token_id, device, greedy=settings.greedy)

    def _play(
        self,
        sampler: Sampler,
        samples: list[_Sample],
        settings: SamplingSettings,
        tokenizer: Any,
        generator: torch.Generator | None,
        g: int,
        version: int,
    ) -> torch.device:
        """Every turn until each sample has stopped; the device the last turn ran on."""
        limit, first = settings.max_new_tokens, True
        while active := [s for s in samples if not s.done]:
            budgets = [min(limit - s.used, self.max_sequence_length - s.length) for s in active]
            contexts = (
                [s.prompt_ids for s in samples[::g]] if first else [s.prompt_ids + s.ids for s in active]
            )
            ro = sampler.sample(
                contexts,
                replace(settings, max_new_tokens=max(1, *budgets)),  # each sample is cut to its own budget
                num_generations=g if first else 1,
                generator=generator,
                version=version,
            )
            for row, (s, budget) in enumerate(zip(active, budgets, strict=True)):
                n = int(ro.completion_mask[row].sum())
                tokens = ro.completion_ids[row, : min(n, budget)].tolist()
                greedy = settings.greedy  # no sampling log-probs
                logps = [0.0] * len(tokens) if greedy else ro.sampling_logps[row, : len(tokens)].tolist()
                s.add(tokens, logps, written=True)
                reply = (self.prefix if first else "") + tokenizer.decode(tokens, skip_special_tokens=True)
                s.conversation.messages.append({"role": "assistant", "content": reply})
                s.conversation.replies.append(reply)
                if bool(ro.truncated[row]) or n > budget:
                    s.stop("tokens")
                    continue
                self._next_turn(s, reply, tokens, tokenizer, limit)
            first = False
        return ro.completion_ids.device

    def _reset(self, samples: list[_Sample], tokenizer: Any, g: int) -> None:
        """One environment per sample; reset's text joins the prompt's user message, so it must be the same for
        the G samples of a row (they share one prompt)."""
        assert self.episodes is not None and self.environment is not None
        self.episodes.begin()
        for k in range(0, len(samples), g):
            texts = []
            for key, s in enumerate(samples[k : k + g], start=k):
                s.env = key  # the sample's environment, in the environments' worker process
                texts.append(self.episodes.reset(key, s.prompt.row))
            if len(set(texts)) != 1:
                raise ConfigError(
                    f"{self.environment.__name__}.reset returned different texts for the same row: the "
                    "samples of a prompt share it, so reset must depend on the row only."
                )
            if texts[0]:
                messages = [*samples[k].prompt.messages]
                messages[-1] = {**messages[-1], "content": f"{messages[-1]['content']}\n\n{texts[0]}"}
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                ids = tokenizer(text + self.prefix, add_special_tokens=False)["input_ids"]
                for s in samples[k : k + g]:
                    s.prompt_ids, s.conversation.messages = ids, list(messages)

    def _next_turn(self, s: _Sample, reply: str, tokens: list[int], tokenizer: Any, limit: int) -> None:
        """The tool results or the observation after `reply`, appended as tokens the model did not write; or
        the end of the sample. `limit`: the model tokens a sample may write over all its turns."""
        if self.episodes is not None:
            observation, done = self.episodes.step(s.env, reply)
            if done or observation is None:
                return s.stop(None)
            if len(s.conversation.replies) > self.max_iterations:
                return s.stop("calls")
            following = [{"role": "user", "content": observation}]
        else:
            calls = self.call_format.find(reply)
            if not calls:
                return s.stop(None)
            if len(s.conversation.tool_calls) + len(calls) > self.max_iterations:
                return s.stop("calls")
            records = [
                run_call(self.tools, call, timeout=self.timeout, max_chars=self.max_chars) for call in calls
            ]
            s.conversation.tool_calls.extend(records)
            following = [{"role": "tool", "content": tool_message(r)} for r in records]
        between = self.between_turns(tokenizer, s.conversation.messages, following, tokens)
        room = min(limit - s.used, self.max_sequence_length - s.length - len(between))
        if room < 1:  # no token left for a reply after these messages
            return s.stop("tokens")
        s.add(between, [0.0] * len(between), written=False)
        s.conversation.messages.extend(following)

    def between_turns(
        self,
        tokenizer: Any,
        messages: list[dict[str, str]],
        following: list[dict[str, str]],
        reply: list[int],
    ) -> list[int]:
        """The tokens between the model's reply (messages[-1], its tokens `reply`) and its next reply, as the
        chat template renders them: the reply's closing text the model did not write, `following`, and the
        next assistant header.

        The reply's end is found by a marker, so the marker must be out of band: one that no text of the
        conversation holds (a tool's output, an observation, the model's own text may hold REPLY_END), checked
        to occur once in the rendering. Else a forged marker would move the cut and turn the model's reply
        into tokens between turns."""
        marker, n = REPLY_END, 0
        while any(marker in str(m.get("content", "")) for m in [*messages, *following]):
            n += 1
            marker = f"\x00reply-end-{n}\x00"
        marked = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + marker}]
        before = tokenizer.apply_chat_template(marked, tools=self.schemas, tokenize=False)
        after = tokenizer.apply_chat_template(
            marked + following, tools=self.schemas, tokenize=False, add_generation_prompt=True
        )
        if not after.startswith(before):
            raise ConfigError(
                "The chat template renders a conversation differently once it grows; it cannot run turns."
            )
        if before.count(marker) != 1:
            raise ConfigError(
                "The chat template renders a reply's text other than once; it cannot run turns."
            )
        text = before[before.index(marker) + len(marker) :] + after[len(before) :]
        ended = tokenizer.decode(reply[-1:]) if reply else ""
        if ended and text.startswith(ended):  # the end token the model sampled is already in the sequence
            text = text[len(ended) :]
        return tokenizer(text, add_special_tokens=False)["input_ids"]


class _Sample:
    """A sample's state during the rollout: its completion so far, which tokens the model wrote, its log-probs."""

    def __init__(self, prompt: Any, conversation: Conversation):
        self.prompt, self.prompt_ids, self.conversation = prompt, list(prompt.ids), conversation
        self.ids: list[int] = []
        self.written: list[int] = []
        self.logps: list[float] = []
        self.used = 0  # model tokens
        self.done = False
        self.env = -1  # the key of its environment (Episodes), when the run has one

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.ids)

    def add(self, tokens: list[int], logps: list[float], *, written: bool) -> None:
        self.ids += tokens
        self.written += [int(written)] * len(tokens)
        self.logps += logps
        self.used += len(tokens) if written else 0

    def stop(self, cut: str | None) -> None:
        self.done, self.conversation.cut = True, cut


def _as_rollout(
    samples: list[_Sample], g: int, pad_id: int, device: torch.device, *, greedy: bool
) -> Rollout:
    """The samples' whole conversations after their prompts, padded, as one Rollout on `device`."""
    width = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask, written, logps = (torch.zeros(len(samples), width) for _ in range(3))
    for i, s in enumerate(samples):
        n = len(s.ids)
        ids[i, :n], mask[i, :n] = torch.tensor(s.ids), 1
        written[i, :n], logps[i, :n] = torch.tensor(s.written, dtype=torch.float), torch.tensor(s.logps)
    prompt_ids, prompt_mask = left_pad([s.prompt_ids for s in samples], pad_id, device)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=ids.to(device),
        completion_mask=mask.long().to(device),
        truncated=torch.tensor([s.conversation.cut == "tokens" for s in samples], device=device),
        group_size=g,
        sampling_logps=None if greedy else logps.to(device),
        model_written=written.long().to(device),
        conversations=[s.conversation for s in samples],
    )


def conversation_metrics(conversations: list[Conversation]) -> dict[str, float]:
    """tools/* and turns/* of a step's samples."""
    n = max(len(conversations), 1)
    calls = [r for conv in conversations for r in conv.tool_calls]
    return {
        "tools/calls_per_sample": len(calls) / n,
        "tools/error_share": sum(r["error"] is not None for r in calls) / max(len(calls), 1),
        "turns/mean": sum(len(conv.replies) for conv in conversations) / n,
        "turns/cut_by_calls_share": sum(conv.cut == "calls" for conv in conversations) / n,
        "turns/cut_by_tokens_share": sum(conv.cut == "tokens" for conv in conversations) / n,
    }


def turn_records(conversation: Conversation) -> dict[str, Any]:
    """A sample's turns for samples.jsonl: the messages after the prompt, the tool calls, why it stopped."""
    return {
        "messages": conversation.messages[conversation.prompt_length :],
        "tool_calls": conversation.tool_calls,
        "cut": conversation.cut,
    }
