"""Turn a trained teacher's best.ckpt into the small weights-only checkpoint committed to the repo.

    python benchmarks/publish_teacher.py RUN_DIR benchmarks/teachers/NAME.ckpt

Keeps only the model weights (no optimiser state), in the ``state_dict`` layout that
``teacher.checkpoint`` loads, and writes ``NAME.json`` beside it: sha256, architecture, dataset,
accuracies, epochs, training time, hardware and the command that made it.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.rows import git_commit, hardware  # noqa: E402
from core.io import atomic_path, read_json, sha256_file, write_json_atomic  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run folder whose teacher stage finished")
    parser.add_argument("out", type=Path, help="where the weights-only checkpoint goes (.ckpt)")
    parser.add_argument("--command", required=True, help="the nonn command that trained it, for the record")
    parser.add_argument("--trained-at", required=True, help="git commit of the code that trained it")
    parser.add_argument("--seconds", type=float, help="training wall time, where the run did not record it")
    args = parser.parse_args()
    results = read_json(args.run_dir / "stages" / "teacher.json", "teacher record")["results"]
    if results.get("test_acc") is None:  # checked before anything is written
        sys.exit(f"publish_teacher.py: {args.run_dir} trained its teacher with trainer.test: false; a committed "
                 "teacher records its test accuracy: rerun `nonn teacher` there with --trainer.test true --force")
    ckpt = torch.load(args.run_dir / "teacher" / "best.ckpt", map_location="cpu", weights_only=True)
    weights = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    buffer = io.BytesIO()  # saved via a buffer: the zip's inner names then never depend on a temporary file name
    torch.save({"state_dict": weights}, buffer)
    with atomic_path(args.out) as tmp:
        tmp.write_bytes(buffer.getvalue())
    config = yaml.safe_load((args.run_dir / "config.yaml").read_text())
    write_json_atomic(args.out.with_suffix(".json"), {
        "file": args.out.name, "sha256": sha256_file(args.out), "arch": config["teacher"]["arch"],
        "dataset": config["data"]["dataset"], "data": config["data"], "teacher": config["teacher"],
        "seed": config["seed"], "test_acc": results["test_acc"], "best_val_acc": results["best_val_acc"],
        "precision": results.get("precision", config["trainer"]["precision"]),
        "fit_seconds": results.get("fit_seconds", args.seconds), "command": args.command,
        "source_checkpoint_sha256": results["teacher_sha256"], "trained_at_commit": args.trained_at,
        "published_at_commit": git_commit(), "hardware": hardware(),
    })
    print(f"{args.out}: {args.out.stat().st_size / 2**20:.1f} MiB, test accuracy {results['test_acc']:.4f}")


if __name__ == "__main__":
    main()
