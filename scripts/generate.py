"""Ask a model one question and stream its answer, prompted exactly as in training.

    python scripts/generate.py MODEL_OR_RUN "question" [--template FILE] [--max-new-tokens N]
                               [--temperature T] [--seed S] [--device cpu|cuda]

MODEL_OR_RUN is a run folder (a template's output_dir: template.yaml beside the model or LoRA adapter), a model
or adapter folder inside one, any other model or adapter folder, a .gguf file, a hub id, or
embedded:smollm2-135m-instruct. The prompt is built like a training prompt: the template's instruction as the
system message, the question in place of the template's input variable, the model's chat template, then the
response prefix. The template is the run's own, else --template, else the built-in default. A LoRA adapter is
put on its base model (adapter_config.json names it). Greedy by default; --temperature > 0 samples.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grpo.run.cli_common import run_cli  # noqa: E402

RUN_TEMPLATE = "template.yaml"
ADAPTER_CONFIG = "adapter_config.json"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="generate.py", description="Stream a model's answer to one question.")
    p.add_argument("model", help="run folder, model or adapter folder, .gguf file, hub id or embedded:...")
    p.add_argument("question", help="the text that replaces the template's input variable")
    p.add_argument("--template", help="template YAML to prompt with (default: the run's own)")
    p.add_argument("--max-new-tokens", type=int, help="default: the template's maximum_completion_length")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return p.parse_args(argv)


def resolve_target(spec: str, template_file: str | None) -> tuple[str, Any]:
    """(model folder or id, Template): a run folder gives its saved model and its own template."""
    from grpo.config import ConfigError, Template, load_template

    path = Path(spec)
    if spec.startswith((".", "/", "~")) and not path.exists():
        raise ConfigError(f"{spec!r}: no such run, model or adapter folder.")
    run_dir = None
    if path.is_dir() and (path / RUN_TEMPLATE).is_file():
        run_dir = path
    elif path.is_dir() and (path.parent / RUN_TEMPLATE).is_file():
        run_dir = path.parent
    if template_file:
        template = load_template(template_file)
    elif run_dir is not None:
        template = load_template(run_dir / RUN_TEMPLATE)
    else:
        template = Template()
    if run_dir is path:
        path = run_dir / template.config.adaptor_name
        if not path.is_dir():
            raise ConfigError(
                f"Run folder {spec!r} has no model folder {path.name!r} yet: the run has not saved its model."
            )
    return (str(path) if path.exists() else spec), template


def load_for_generation(model: str, *, device: Any, dtype: Any) -> tuple[Any, Any]:
    """The model (with its LoRA adapter when `model` is an adapter folder) and its tokenizer."""
    from grpo.model.loading import load_model, load_tokenizer
    from grpo.model.lora import load_adapter, merge_lora

    adapter_config = Path(model) / ADAPTER_CONFIG
    if not adapter_config.is_file():
        return load_model(model, device=device, dtype=dtype), load_tokenizer(model)
    base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    net = load_model(base, device=device, dtype=dtype)
    load_adapter(net, model)
    merge_lora(net)  # one matmul per projection while generating
    has_tokenizer = (Path(model) / "tokenizer_config.json").is_file()
    return net, load_tokenizer(model if has_tokenizer else base)


def render_prompt(template: Any, tokenizer: Any, question: str) -> Any:
    """The question as a training prompt: it fills the input's one variable, or is the whole user message."""
    from grpo.data import build_prompts, input_variable

    name = input_variable(template.template.input)
    tmpl = dataclasses.replace(template.template, output="")
    if name is None:
        tmpl, name = dataclasses.replace(tmpl, input="{{question}}"), "question"
    c = template.config
    row = {name: question}
    return build_prompts(
        [row], tmpl, tokenizer, max_prompt_tokens=c.maximum_sequence_length - c.maximum_completion_length
    )[0]


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    def job() -> int:
        import torch
        from transformers import TextStreamer

        from grpo.config import ConfigError
        from grpo.model.loading import stop_token_ids

        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens = {args.max_new_tokens} must be at least 1.")
        if args.temperature < 0:
            raise ConfigError(f"--temperature = {args.temperature} must be 0 (greedy) or more.")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is visible.")
        model_id, template = resolve_target(args.model, args.template)
        use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        device = torch.device("cuda" if use_cuda else "cpu")
        model, tokenizer = load_for_generation(
            model_id, device=device, dtype=torch.bfloat16 if use_cuda else torch.float32
        )
        prompt = render_prompt(template, tokenizer, args.question)
        torch.manual_seed(args.seed)
        sampling = {"do_sample": False}
        if args.temperature > 0:
            sampling = {"do_sample": True, **template.config.sampling(), "temperature": args.temperature}
        print(template.template.response_prefix, end="", flush=True)  # part of the prompt, not streamed
        ids = torch.tensor([prompt.ids], device=device)
        model.eval()
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.max_new_tokens or template.config.maximum_completion_length,
            eos_token_id=stop_token_ids(model, tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
            use_cache=True,
            **sampling,
        )
        return 0

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
