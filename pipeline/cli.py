"""``nonn`` command line: one subcommand per stage, ``run`` for all of them in order, and the
deployment runtime (``serve``, ``deploy``).

Only the standard library and ``serve.cli`` are imported up front: ``nonn serve device`` must run where
torch is absent, so every command imports what it needs inside its own function.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import sys
import warnings
from pathlib import Path

from serve import defaults
from serve.cli import add_broker_options, add_link_options, add_public_key_option, guarded
from serve.cli import add_commands as add_runtime_commands
from serve.cli import run as run_runtime

COMMANDS = {"run": "all stages in order, then print report.md",
            "teacher": "train the teacher",
            "partition": "teacher activations -> filter graph -> K partitions",
            "distill": "train the K students jointly",
            "export": "write the per-device bundle",
            "evaluate": "report.json / report.md from the exported bundle"}
DEPLOY_HELP = "broker + K device processes + aggregator; stream the test split, fault drill, deploy_report"
COMPARE_HELP = "finished runs side by side: comparison.md/.json and three plots"


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
        if name in ("run", "export"):
            p.add_argument("--sign", type=Path, default=None, metavar="KEY", help="sign each bundle's manifest with "
                           "this Ed25519 private key (PEM); the same as --export.sign_key KEY")
    add_runtime_commands(sub)
    add_deploy_command(sub)
    compare = sub.add_parser("compare", help=COMPARE_HELP, description=COMPARE_HELP)
    compare.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="finished run folders")
    compare.add_argument("--out", type=Path, default=Path("comparison"), help="where the table and plots go "
                         "(default: ./comparison)")
    compare.add_argument("--link-mbit", type=float, default=1.0, help="link rate (Mbit/s) for the modelled latency "
                         "of runs that were not deployed (default 1)")
    return parser


def add_deploy_command(sub: argparse._SubParsersAction) -> None:
    deploy = sub.add_parser("deploy", help=DEPLOY_HELP, description=DEPLOY_HELP)
    where = deploy.add_mutually_exclusive_group(required=True)
    where.add_argument("--run-dir", type=Path, help="a finished run: its export/ and report.json")
    where.add_argument("--bundle", type=Path, help="an export folder")
    where.add_argument("--select", type=Path, nargs="+", metavar="RUN_DIR", help="finished runs to choose between: "
                       "serve with the most accurate bundle whose p95 meets --deadline-ms, switching as latency "
                       "drifts (writes select_report.json/.md)")
    deploy.add_argument("--out", type=Path, default=None,
                        help="where deploy_report.json/.md go (default: the run folder, or next to the bundle)")
    add_broker_options(deploy, required=False)
    deploy.add_argument("--credentials-dir", type=Path, default=None,
                        help="with --broker: the credentials/ folder 'nonn serve broker' wrote for that broker")
    deploy.add_argument("--limit", type=int, default=None, help="stream only the first N test images")
    deploy.add_argument("--external", action="store_true", help="with --broker: the device and aggregator "
                        "processes already run elsewhere; wait for them instead of starting them (no fault drill)")
    # None: the run's config (deploy section), else the built-in default
    deploy.add_argument("--deadline-ms", type=float, default=None, help=f"default: deploy.deadline_ms ({defaults.DEADLINE_MS:g})")
    deploy.add_argument("--window", type=int, default=None, help="requests in flight in the throughput phase "
                        f"(default: deploy.window, {defaults.WINDOW})")
    deploy.add_argument("--drill-images", type=int, default=None, help="images streamed in the fault drill, 0: "
                        f"none (default: deploy.drill_images, {defaults.DRILL_IMAGES})")
    deploy.add_argument("--drill-device", type=int, default=None, help="the device the drill kills "
                        f"(default: deploy.drill_device, {defaults.DRILL_DEVICE})")
    deploy.add_argument("--data-dir", default=None, help="dataset folder (default: the run's data.data_dir)")
    deploy.add_argument("--mp", action="store_true", help="also measure the run's model-parallel baseline "
                        "(export_mp/: the teacher cut layer-wise) through the same broker, side by side")
    deploy.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    add_link_options(deploy)
    add_public_key_option(deploy)
    deploy.add_argument("--link-scope", choices=("all", "devices"), default="all",
                        help="who sends through the emulated links: every sender (default) or only the devices")
    deploy.add_argument("--change-link-at", type=int, default=None, metavar="N", help="with --select: before "
                        "request N, give devices --change-link-devices the link below (a radio that degrades)")
    deploy.add_argument("--change-link-mbit", type=float, default=None, help="with --change-link-at: Mbit/s")
    deploy.add_argument("--change-link-ms", type=float, default=None, help="with --change-link-at: latency, ms")
    deploy.add_argument("--change-link-devices", default="0", help="with --change-link-at: comma-separated "
                        "device indices (default 0)")


def not_an_advert(record: logging.LogRecord) -> bool:
    """False for Lightning's "Tip: try installing litlogger", printed by every Trainer of every stage."""
    return not record.getMessage().startswith("💡 Tip:")


def quiet_known_noise() -> None:
    """Lightning warnings that are expected here (the frozen teacher is in eval mode on purpose)."""
    for pattern in (r".*module\(s\) in eval mode at the start of training", r".*isinstance\(treespec, LeafSpec\)",
                    r".*Checkpoint directory .* exists and is not empty", r".*is smaller than the logging interval"):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(not_an_advert)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    if args.command not in COMMANDS:
        if overrides:
            parser.error(f"unrecognized arguments: {' '.join(overrides)}")
        if args.command == "compare":
            return guarded(run_compare, args)
        return guarded(run_deploy, args) if args.command == "deploy" else run_runtime(args)
    return run_pipeline(args, overrides)


def run_deploy(args: argparse.Namespace) -> int:
    from core.signals import Terminated
    from pipeline.deploy import deploy_from_args  # torch: only for this command

    try:
        print(deploy_from_args(args))
    except Terminated:
        print("nonn: stopped by SIGTERM; the broker, devices and aggregator it started are stopped", file=sys.stderr)
        return 143
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from pipeline.compare import compare

    if args.link_mbit <= 0:
        raise ValueError(f"--link-mbit {args.link_mbit:g}: must be above 0")
    print(compare(args.run_dirs, args.out, args.link_mbit))
    print(f"nonn: table and plots written to {args.out}")
    return 0


def run_pipeline(args: argparse.Namespace, overrides: list[str]) -> int:
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from core.io import run_lock
    from core.signals import Terminated
    from distill.ranks import is_worker
    from pipeline.config import ConfigError, load_config, run_dir_of
    from pipeline.context import Context
    from pipeline.records import STAGES
    from pipeline.stages import run_stage

    quiet_known_noise()
    if getattr(args, "sign", None) is not None:
        overrides = [*overrides, "--export.sign_key", str(args.sign)]
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
        print(f"nonn: error: {_describe(e, ctx.run_dir)}", file=sys.stderr)
        return 1
    except (SIGTERMException, Terminated, KeyboardInterrupt) as e:
        # Lightning turns SIGTERM into a SystemExit with code 0: an unfinished stage must not look finished
        name = "SIGINT" if isinstance(e, KeyboardInterrupt) else "SIGTERM"
        print(f"nonn: stopped by {name}; finished epochs are kept, rerun the same command to resume", file=sys.stderr)
        return 143 if name == "SIGTERM" else 130
    if args.command in ("run", "evaluate"):
        print((ctx.run_dir / "report.md").read_text())
    return 0


def _describe(error: Exception, run_dir: Path) -> str:
    """One line; a full disk names the run folder and the file (an ``[Errno 28]`` alone names neither)."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" while writing {error.filename}" if error.filename else ""
        return f"no space left on the disk holding {run_dir}{where}; free some space and rerun"
    return str(error)
