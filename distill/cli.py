"""``nonn`` command line: one subcommand per stage, ``run`` for all of them in order, and the
deployment runtime (``serve``, ``deploy``).

Only the standard library is imported up front: ``nonn serve device`` must run where torch is absent.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path

from serve.cli import add_commands as add_runtime_commands
from serve.cli import run as run_runtime

COMMANDS = {"run": "all stages in order, then print report.md",
            "teacher": "train the teacher",
            "partition": "teacher activations -> filter graph -> K partitions",
            "distill": "train the K students jointly",
            "export": "write the per-device bundle",
            "evaluate": "report.json / report.md from the exported bundle"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nonn", description="NoNN: distil one network into K cooperating "
                                     "students, one per device.",
                                     epilog="Any --section.key VALUE after the options overrides the config, "
                                     "e.g. --distill.epochs 3 --wandb.mode disabled.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", type=Path, default=None,
                       help="YAML profile, e.g. configs/fashion_mnist/quick.yaml (default: built-in defaults)")
        p.add_argument("--run-dir", type=Path, default=None, help="run folder (default: runs/<name>)")
        p.add_argument("--force", action="store_true", help="redo the stage(s) even if up to date")
    add_runtime_commands(sub)
    return parser


def quiet_known_noise() -> None:
    """Lightning warnings that are expected here (the frozen teacher is in eval mode on purpose)."""
    for pattern in (r".*module\(s\) in eval mode at the start of training", r".*isinstance\(treespec, LeafSpec\)",
                    r".*Checkpoint directory .* exists and is not empty", r".*is smaller than the logging interval"):
        warnings.filterwarnings("ignore", message=pattern)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    if args.command not in COMMANDS:
        if overrides:
            parser.error(f"unrecognized arguments: {' '.join(overrides)}")
        return run_runtime(args)
    return run_pipeline(args, overrides)


def run_pipeline(args: argparse.Namespace, overrides: list[str]) -> int:
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from distill.config import ConfigError, load_config, run_dir_of
    from distill.io import run_lock
    from distill.ranks import is_worker
    from distill.context import Context
    from distill.records import STAGES
    from distill.stages import run_stage

    quiet_known_noise()
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"nonn: error: {e}", file=sys.stderr)
        return 2
    if args.run_dir is not None:
        config["run_dir"] = str(args.run_dir)
    ctx = Context(config, run_dir_of(config), force=args.force)
    try:
        # data-parallel workers run inside their rank 0's lock
        with contextlib.nullcontext() if is_worker() else run_lock(ctx.run_dir):
            for stage in STAGES if args.command == "run" else (args.command,):
                run_stage(ctx, stage)
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as e:
        print(f"nonn: error: {e}", file=sys.stderr)
        return 1
    except (SIGTERMException, KeyboardInterrupt) as e:
        # Lightning turns SIGTERM into a SystemExit with code 0: an unfinished stage must not look finished
        name = "SIGTERM" if isinstance(e, SIGTERMException) else "SIGINT"
        print(f"nonn: stopped by {name}; finished epochs are kept, rerun the same command to resume", file=sys.stderr)
        return 143 if name == "SIGTERM" else 130
    if args.command in ("run", "evaluate"):
        print((ctx.run_dir / "report.md").read_text())
    return 0
