"""The training template's schema: one dataclass tree with defaults and a description per field.

A template is what a user saves and queues. Field names follow Transformer Lab's GRPO plugins so settings carry
over. Reading one (YAML, key=value overrides, type checks) is grpo/config/loading.py; the range checks are
grpo/config/checks.py. TrainConfig inherits the loss's fields (loss_settings.py, each variant's options coming
from the loss table, loss_table.py) and the rollout's (rollout_settings.py). Everything here is cheap: validation
runs before any model or dataset loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from grpo.config import fields as declared
from grpo.config.fields import (
    AT_LEAST_1,
    NOT_BLANK,
    NULL_OR_COUNT,
    OFF_OR_MORE,
    POSITIVE,
    SEED,
    SEQUENCE_LENGTH,
    TIMEOUT_OR_OFF,
    ZERO_OR_MORE,
    Check,
    doc,
    within,
)
from grpo.config.loss_settings import LossSettings
from grpo.config.rollout_settings import RolloutSettings

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
BUILTIN_DATASET = "builtin:arithmetic"

SEED_INSTRUCTION = """Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>"""


@dataclass
class DatasetConfig:
    path: str = doc(
        "Hub id (openai/gsm8k), a local .jsonl/.json/.csv/.parquet file, builtin:arithmetic or builtin:multiply.",
        default=BUILTIN_DATASET,
    )
    config: str | None = doc("Dataset config name on the hub (gsm8k: main).", default=None)
    split: str = doc("Split to train on.", default="train")
    limit: int | None = doc(
        "Use only the first N rows (null = all).",
        default=None,
        check=NULL_OR_COUNT,
    )
    eval_split: str = doc(
        "Held-out split for evaluation (a local file path also works).", default="test", resume_safe=True
    )
    missing_columns: Literal["error", "drop"] = doc(
        "Rows without a value (absent or null) for a column the template uses, checked on every row before the "
        "model loads: error (refuse the dataset, naming the column and the first such rows) or drop (left out; "
        "the log says how many).",
        default="error",
    )


@dataclass
class DataTemplate:
    instruction: str = doc("System prompt (Jinja2).", default=SEED_INSTRUCTION)
    input: str = doc("User message rendered per row with Jinja2, e.g. {{question}}.", default="{{question}}")
    output: str = doc(
        "Reference answer rendered per row; the text after '#### ' is used when present.",
        default="{{answer}}",
    )
    response_prefix: str = doc(
        "Text the reply starts with, appended after the chat template's generation prompt (e.g. '<reasoning>\\n'); "
        "rewards see it as part of the completion.",
        default="",
    )


@dataclass
class TrainConfig(LossSettings, RolloutSettings):
    # -- device and placement
    train_device: Literal["auto", "cuda", "cpu", "tpu"] = doc(
        "Where to train: auto picks cuda when present.", default="auto", resume_safe=True
    )
    gpu_ids: Literal["auto"] | list[int] = doc(
        "auto = all visible GPUs, or a list of ids.",
        default="auto",
        check=Check(
            lambda v: v == "auto" or (len(v) > 0 and all(i >= 0 for i in v)),
            "use auto or a non-empty list of GPU indices",
        ),
        resume_safe=True,
    )
    distributed_strategy: Literal["ddp", "fsdp"] = doc(
        "Multi-process strategy under torchrun.", default="ddp", resume_safe=True
    )
    dtype: Literal["auto", "bf16-mixed", "float32", "bfloat16", "float16", "float64"] = doc(
        "Training dtype: auto = bf16-mixed on GPU, float32 on CPU. bf16-mixed keeps the trained weights and "
        "AdamW's state in fp32 and computes in bf16; bfloat16/float16 store the weights themselves in that "
        "dtype (half the memory, but AdamW steps below the weight's precision are lost: at lr 1e-6 most); "
        "float64 is for checking numerics (slow).",
        default="auto",
    )
    # -- the four tags of the reasoning format
    start_thinking_string: str = doc("Tag that opens the reasoning.", default="<reasoning>", check=NOT_BLANK)
    end_thinking_string: str = doc("Tag that closes the reasoning.", default="</reasoning>", check=NOT_BLANK)
    start_answer_string: str = doc("Tag that opens the answer.", default="<answer>", check=NOT_BLANK)
    end_answer_string: str = doc("Tag that closes the answer.", default="</answer>", check=NOT_BLANK)
    # -- lengths and batches
    maximum_sequence_length: int = doc(
        "Prompt + completion tokens; longer prompts are cut from the left.",
        default=1024,
        check=SEQUENCE_LENGTH,
    )
    maximum_completion_length: int = doc("Most tokens sampled per completion.", default=256, check=AT_LEAST_1)
    long_prompts: Literal["truncate", "drop"] = doc(
        "Training prompts over maximum_sequence_length - maximum_completion_length tokens: truncate (cut from "
        "the left, which can cut the system prompt) or drop (left out; the log says how many).",
        default="truncate",
    )
    batch_size: int = doc(
        "Prompts per device per step (each sampled num_generations times).", default=4, check=AT_LEAST_1
    )
    micro_batch_size: int = doc(
        "Sequences per forward/backward of the loss (0 = all at once).",
        default=0,
        check=ZERO_OR_MORE,
        resume_safe=True,
    )
    gradient_checkpointing: bool = doc(
        "Recompute each decoder layer in backward instead of keeping its activations: much less memory for "
        "about one more forward of time; the log-prob passes then run prompt + completion per sequence.",
        default=False,
    )
    # -- optimisation
    learning_rate_schedule: Literal["constant", "linear", "cosine", "constant_with_warmup"] = doc(
        "Learning-rate schedule after warmup.", default="constant"
    )
    learning_rate: float = doc("Peak learning rate of AdamW.", default=1e-6, check=POSITIVE)
    warmup_ratio: float = doc(
        "Share of the total steps spent warming up linearly from 0.",
        default=0.0,
        check=within(0, 1, high_open=True),
    )
    num_train_epochs: int = doc("Passes over the dataset.", default=1, check=AT_LEAST_1, resume_safe=True)
    max_steps: int = doc(
        "Optimizer steps to run; -1 = as many as the epochs give.",
        default=-1,
        check=Check(lambda v: v == -1 or v >= 1, "use -1 or a positive count"),
        resume_safe=True,
    )
    max_grad_norm: float = doc(
        "Clip the global gradient norm to this (0 = no clipping).", default=1.0, check=ZERO_OR_MORE
    )
    weight_decay: float = doc("AdamW weight decay.", default=0.0, check=ZERO_OR_MORE)
    adam_beta1: float = doc("AdamW beta1.", default=0.9, check=within(0, 1, high_open=True))
    adam_beta2: float = doc("AdamW beta2.", default=0.99, check=within(0, 1, high_open=True))
    adam_epsilon: float = doc("AdamW epsilon.", default=1e-8, check=POSITIVE)
    seed: int = doc("Seed for data order, sampling and initialisation.", default=42, check=SEED)
    # -- LoRA
    use_lora: bool = doc("Train a LoRA adapter instead of all weights.", default=False)
    adaptor_name: str = doc("Folder name of the trained adapter/model inside output_dir.", default="model")
    lora_r: int = doc("LoRA rank.", default=16, check=AT_LEAST_1)
    lora_alpha: float = doc("LoRA alpha (scaling = alpha / r).", default=32, check=POSITIVE)
    lora_dropout: float = doc("Dropout on the LoRA input.", default=0.05, check=within(0, 1, high_open=True))
    lora_target_modules: list[str] | None = doc(
        "Module leaf names to adapt (null = attention + MLP).", default=None
    )
    backend: Literal["torch", "unsloth"] = doc(
        "torch (ours) or unsloth (FastLanguageModel).", default="torch"
    )
    export_merged: bool = doc(
        "With LoRA, also write the merged model as a plain HF folder <output_dir>/<adaptor_name>-merged.",
        default=False,
        resume_safe=True,
    )
    load_in_4bit: bool = doc("backend unsloth only: load the base model in 4 bit (QLoRA).", default=False)
    # -- GRPO
    num_generations: int = doc(
        "G: completions sampled per prompt.",
        default=4,
        check=Check(lambda v: v >= 2, "GRPO needs at least 2 generations per prompt to compare them"),
    )
    temperature: float = doc("Sampling temperature.", default=1.0, check=POSITIVE)
    top_p: float = doc(
        "Nucleus sampling: keep the smallest token set with this probability.",
        default=1.0,
        check=within(0, 1, low_open=True),
    )
    top_k: int = doc(
        "Sample only among the k most probable tokens (applied before top_p); 0 = no limit.",
        default=0,
        check=Check(lambda v: v >= 0, "it must be 0 (no limit) or more"),
    )
    min_p: float = doc(
        "Drop tokens less probable than min_p times the most probable one (applied after top_p); 0 = off.",
        default=0.0,
        check=within(0, 1),
    )
    ref_model_sync_steps: int = doc(
        "Every N steps move the KL reference towards the policy: reference = ref_model_mixup_alpha * policy + "
        "(1 - alpha) * reference (TR-DPO, arXiv:2404.09656; grpo/model/reference_sync.py); 0 = the reference stays the "
        "starting model.",
        default=0,
        check=OFF_OR_MORE,
    )
    ref_model_mixup_alpha: float = doc(
        "Weight of the policy in each reference update; 1 = copy the policy.",
        default=0.6,
        check=within(0, 1, low_open=True),
    )
    num_iterations: int = doc("Policy updates per batch of samples (mu).", default=1, check=AT_LEAST_1)
    mini_batches: int = doc(
        "Split each step's prompts (with all their G completions) into this many mini-batches and make one "
        "optimizer update per mini-batch, PPO-style (TRL's steps_per_generation): a step makes num_iterations x "
        "mini_batches updates from one rollout. Must divide batch_size.",
        default=1,
        check=AT_LEAST_1,
    )
    scale_rewards: Literal["group", "batch", "none"] = doc(
        "Divide advantages by the std of the group, the batch, or not at all.", default="group"
    )
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = doc(
        "Several rewards: normalise their weighted sum, or normalise each within its group, sum, then normalise "
        "over the batch (GDPO), so a reward on a large scale does not drown the others.",
        default="sum_then_normalize",
    )
    rewards: list[Any] = doc(
        "Reward functions: names or package.module:function, or {name: ..., weight: ..., KEY: VALUE} where "
        "the other keys are passed to the function.",
        default_factory=lambda: ["correctness", "int_answer", "strict_format", "soft_format", "tag_count"],
        check=Check(lambda v: len(v) >= 1, "name at least one reward function"),
    )
    reward_timeout: float = doc(
        "Seconds one call of a reward function may take; a call that takes longer stops the run, naming the "
        "function (docs/rewards.md). 0 = no limit, and the function runs in the calling thread.",
        default=300.0,
        check=TIMEOUT_OR_OFF,
        resume_safe=True,
    )
    cast_lm_head_to_fp32: bool = doc(
        "Log-prob passes: the LM head and its softmax in fp32 even under bf16 (ScaleRL).", default=False
    )
    logprob_impl: Literal["auto", "chunked", "naive", "triton"] = doc(
        "How per-token log-probs are computed (kernels/).", default="auto", resume_safe=True
    )
    # -- outputs
    output_dir: str = doc(
        "Run folder: model, metrics.jsonl, TensorBoard, samples.", default="runs/default", resume_safe=True
    )
    logging_steps: int = doc(
        "Write samples of completions every N steps.", default=1, check=AT_LEAST_1, resume_safe=True
    )
    eval_steps: int = doc(
        "Greedy evaluation on dataset.eval_split every N steps and after the save (eval.json); 0 = off.",
        default=0,
        check=OFF_OR_MORE,
        resume_safe=True,
    )
    eval_limit: int = doc(
        "Held-out problems used by each evaluation during training.",
        default=200,
        check=AT_LEAST_1,
        resume_safe=True,
    )
    save_best: bool = doc(
        "With eval_steps: copy the model to <output_dir>/<adaptor_name>-best whenever the held-out accuracy "
        "beats every earlier evaluation of the run; best.json names the step and accuracy.",
        default=False,
        resume_safe=True,
    )
    log_to_wandb: bool = doc("Also log to Weights & Biases.", default=False, resume_safe=True)
    wandb_project: str = doc("W&B project name.", default="grpo", resume_safe=True)
    # -- checkpoints and resume
    save_steps: int = doc(
        "Write a resumable checkpoint every N steps (0 = only the final model).",
        default=0,
        check=ZERO_OR_MORE,
        resume_safe=True,
    )
    save_total_limit: int = doc(
        "Keep only the newest K checkpoints (0 = keep all).", default=0, check=ZERO_OR_MORE, resume_safe=True
    )
    resume_from_checkpoint: str | None = doc(
        "latest or a checkpoints/step-N folder: continue that run.", default=None, resume_safe=True
    )
    force_resume: bool = doc(
        "Resume even when the template differs in fields that change the math.",
        default=False,
        resume_safe=True,
    )
    skip_nonfinite_steps: bool = doc(
        "Skip a step whose loss or gradient is not finite instead of stopping.",
        default=False,
        resume_safe=True,
    )

    def sampling(self) -> dict[str, Any]:
        """The settings that shape the sampling distribution, as keyword arguments of grpo.rollout.generate.generate."""
        return {name: getattr(self, name) for name in ("temperature", "top_p", "top_k", "min_p")}


@dataclass
class Template:
    name: str = doc(
        "Template name.",
        default="default",
        check=Check(lambda v: v.strip() != "", "give the template a name"),
        resume_safe=True,
    )
    model: str = doc("Hub id, local folder, .gguf file, or the embedded SmolLM2.", default=EMBEDDED_MODEL)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    template: DataTemplate = field(default_factory=DataTemplate)
    config: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"dataset": DatasetConfig, "template": DataTemplate, "config": TrainConfig}


LEAF_PATHS = declared.leaf_paths(Template, SECTIONS)  # every settable field: dotted path -> path tuple
ALIASES = {"resume": ("config", "resume_from_checkpoint")}  # resume=latest on the command line


def field_docs() -> list[tuple[str, str, str]]:
    """(dotted name, default, doc) for every field: the README's template reference."""
    fields = {dotted: leaf_field(dotted) for dotted in LEAF_PATHS}
    defaults = {
        d: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for d, f in fields.items()
    }
    return [(dotted, repr(defaults[dotted]), f.metadata.get("doc", "")) for dotted, f in fields.items()]


def leaf_field(dotted: str) -> dataclasses.Field:
    path = LEAF_PATHS[dotted]
    cls = SECTIONS[path[0]] if len(path) == 2 else Template
    return next(f for f in dataclasses.fields(cls) if f.name == path[-1])


# Fields a resume may change (force_resume is needed for any other difference): grpo/run/checkpoint.py.
RESUME_SAFE_FIELDS = frozenset(d for d in LEAF_PATHS if leaf_field(d).metadata["resume_safe"])
