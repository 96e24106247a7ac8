"""`grpo`: saved training templates, a job queue and a worker.

  grpo template save NAME FILE.yaml        validate and store a template (import-tlab FILE.json for Transformer Lab;
                                           --replace to overwrite one)
  grpo template list | show NAME | delete NAME | export NAME
  grpo queue NAME [key=value ...]          queue a job (prints its id)
  grpo resume JOB [key=value ...]          queue an ended job again from its newest checkpoint
  grpo jobs [JOB]                          list jobs: state, progress, last mean reward, times
  grpo logs JOB [--follow]                 the job's training log
  grpo stop JOB                            running: stop at the next step and keep the model; queued: cancel
  grpo worker [--once] [--parallel N]      run queued jobs (N at once when their GPUs differ)
  grpo tensorboard JOB [--start]           how to watch a job in TensorBoard
  grpo recover                             rebuild a damaged database from the job folders and saved templates
  grpo vllm-serve MODEL [options]          a vLLM server for rollout_engine: vllm, vllm_mode: server
                                           (options go to `vllm serve`: --port, --dtype, ...; docs/vllm.md)

The workspace is GRPO_HOME (default ~/.grpo). User mistakes print one `error: ...` line and exit 2.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from typing import NoReturn

from grpo.config import ConfigError
from grpo.jobs import commands


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help).", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="grpo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    tpl = sub.add_parser("template", help="save, list, show, delete, export or import templates")
    tsub = tpl.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = tsub.add_parser("save", help="validate FILE.yaml and store it as NAME")
    s.add_argument("name")
    s.add_argument("file")
    s.add_argument("--replace", action="store_true", help="overwrite a template of that name")
    s = tsub.add_parser("list", help="saved templates")
    s.add_argument("--json", action="store_true")
    s = tsub.add_parser("show", help="one template")
    s.add_argument("name")
    s.add_argument("--json", action="store_true")
    s = tsub.add_parser("delete", help="remove a template (its jobs stay)")
    s.add_argument("name")
    s = tsub.add_parser("export", help="print a template as YAML")
    s.add_argument("name")
    s = tsub.add_parser("import-tlab", help="store a Transformer Lab GRPO plugin config (JSON)")
    s.add_argument("file")
    s.add_argument("--name", help="template name (default: the config's name or the file name)")
    s.add_argument("--replace", action="store_true", help="overwrite a template of that name")

    s = sub.add_parser("queue", help="queue a job from a template with key=value overrides")
    s.add_argument("name")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s = sub.add_parser(
        "resume",
        help="queue an interrupted, failed, stopped or completed job again from its newest checkpoint",
    )
    s.add_argument("job")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s = sub.add_parser("jobs", help="list jobs (or show one)")
    s.add_argument("job", nargs="?")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("logs", help="print a job's log")
    s.add_argument("job")
    s.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    s = sub.add_parser("stop", help="stop a running job at the next step, or cancel a queued one")
    s.add_argument("job")
    s = sub.add_parser("worker", help="run queued jobs one at a time")
    s.add_argument("--once", action="store_true", help="exit when the queue is empty instead of waiting")
    s.add_argument("--poll", type=float, default=2.0, metavar="SECONDS", help="queue polling interval")
    s.add_argument(
        "--parallel", type=int, default=1, metavar="N", help="run up to N jobs at once (on distinct GPUs)"
    )
    s = sub.add_parser("tensorboard", help="print (or --start) the TensorBoard command for a job")
    s.add_argument("job")
    s.add_argument("--start", action="store_true")
    sub.add_parser(
        "recover", help="rebuild the database's lost rows from the job folders and saved templates"
    )
    s = sub.add_parser(
        "vllm-serve",
        help="serve MODEL's rollouts with vLLM for vllm_mode: server, on 127.0.0.1 unless --host, every route but "
        "/health behind GRPO_VLLM_SECRET (other options go to `vllm serve`; docs/vllm.md)",
    )
    s.add_argument("model", help="a model folder, a .gguf file, embedded, or a hub id")
    s.add_argument("options", nargs=argparse.REMAINDER, help="options for `vllm serve`, e.g. --port 8000")
    return p


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "recover":  # before opening the store, which refuses a damaged workspace
        commands.recover()
        return 0
    if args.command == "vllm-serve":  # needs no workspace; replaces this process with vLLM's server
        from grpo.rollout.engines.vllm_serve import serve

        serve(args.model, args.options)
    store = commands.Store()
    try:
        if args.command == "template":
            if args.action == "save":
                commands.template_save(store, args.name, args.file, args.replace)
            elif args.action == "list":
                commands.template_list(store, args.json)
            elif args.action == "show":
                commands.template_show(store, args.name, args.json)
            elif args.action == "delete":
                commands.template_delete(store, args.name)
            elif args.action == "export":
                commands.template_show(store, args.name, as_json=False)
            elif args.action == "import-tlab":
                commands.template_import_tlab(store, args.file, args.name, args.replace)
        elif args.command == "queue":
            commands.queue(store, args.name, args.overrides)
        elif args.command == "resume":
            commands.resume(store, args.job, args.overrides)
        elif args.command == "jobs":
            commands.jobs(store, args.job, args.json)
        elif args.command == "logs":
            commands.logs(store, args.job, args.follow)
        elif args.command == "stop":
            commands.stop(store, args.job)
        elif args.command == "worker":
            return commands.worker(store, args.once, args.poll, args.parallel)
        elif args.command == "tensorboard":
            return commands.tensorboard(store, args.job, args.start)
        return 0
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return dispatch(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except sqlite3.Error as e:
        print(f"error: the job database failed ({e}); check GRPO_HOME.", file=sys.stderr)
        return 1
    except OSError as e:
        print(
            f"error: {e.strerror or e}: {e.filename or ''} (check GRPO_HOME and file permissions).",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
