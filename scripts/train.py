"""Train with GRPO from a template: `python scripts/train.py CONFIG [key=value ...]` or under torchrun."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grpo.run.cli_common import run_cli  # noqa: E402


def main(argv: list[str]) -> int:
    from grpo.config import load_template
    from grpo.parallel.launch import run_rank
    from grpo.trainer import GRPOTrainer

    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("Example: python scripts/train.py configs/default.yaml max_steps=2 output_dir=runs/try")
        return 0 if argv else 2

    def job() -> int:
        from grpo.run.run_report import closing_report, example_question

        template = load_template(argv[0], argv[1:])
        trainer = GRPOTrainer(template)
        path = trainer.train()
        if trainer.env.is_main:
            example = example_question(template.template.input, trainer.prompts[0].row)
            report = closing_report(
                run_dir=trainer.output_dir,
                model_dir=path,
                template=template,
                example=example,
                scripts_dir=Path(__file__).resolve().parent,
            )
            print(report, flush=True)
        return 0

    return run_rank(lambda: run_cli(job))  # under torchrun a failing rank exits at once


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
