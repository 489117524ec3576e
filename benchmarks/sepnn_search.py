"""SepNN's exchange search (issue 21), weight-sharing: train one supernet of K separable branches on a
random exchange policy per step (KD from the teacher), then rank policies on the validation split by
accuracy and bytes per image, and keep the Pareto front. The test set is never read.

    python benchmarks/sepnn_search.py --config configs/fashion_mnist/standard.yaml --run-dir RUN \\
        --epochs 8 --policies 48 --set teacher.checkpoint=benchmarks/teachers/fmnist-wrn_16_2.ckpt

Writes ``RUN/sepnn_search.json`` (every ranked policy, the front, the machine, the command) and
``RUN/sepnn_search.png``; ``--out`` copies the record (e.g. into benchmarks/results/sepnn/), and
``--supernet-out`` writes the supernet's best weights alone (what ``method_options.sepnn.init`` reads to
fine-tune the chosen policy; a few hundred KB instead of the training checkpoint). Each branch ends in
LCP's head unless ``--no-head`` (``method_options.sepnn.head``; a supernet fine-tunes only a config that
agrees with it).
The supernet trains with the pipeline's own fit (best/last checkpoints, resumes when rerun).
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.rows import git_commit, hardware  # noqa: E402
from core.io import atomic_path, write_json_atomic  # noqa: E402
from distill.losses import build_losses  # noqa: E402
from distill.modules import SeparableModule  # noqa: E402
from distill.tracking import Tracker  # noqa: E402
from pipeline.cli import quiet_known_noise  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.context import Context  # noqa: E402
from pipeline.fitting import fit  # noqa: E402
from pipeline.loading import load_teacher  # noqa: E402
from students.complexity import count_params  # noqa: E402
from students.separable import FRACTIONS, Exchange, ExchangePolicy, SeparableNet, pareto_front, rank_policies  # noqa: E402


def candidate_policies(num_points: int, num_devices: int, sampled: int, seed: int) -> list[ExchangePolicy]:
    """No exchange (LCP's branches), every single point at each fraction, everywhere, and ``sampled``
    random policies (seeded), without repeats."""
    ring = tuple((j + 1) % num_devices for j in range(num_devices))
    fixed = [ExchangePolicy(), ExchangePolicy.everywhere(num_points, num_devices)]
    fixed += [ExchangePolicy({p: Exchange(ring, f)}) for p in range(num_points) for f in FRACTIONS]
    rng, seen, out = random.Random(seed), set(), []
    for policy in fixed + [ExchangePolicy.sample(rng, num_points, num_devices) for _ in range(sampled)]:
        key = str(policy.to_dict())
        if key not in seen:
            seen.add(key)
            out.append(policy)
    return out


def write_supernet(checkpoint: dict, path: Path) -> None:
    """The branches' and classifier's weights of a supernet checkpoint (``model.*``), in the form
    ``methods.sepnn.start_from`` reads; written whole or not at all."""
    weights = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    with atomic_path(path) as tmp:
        torch.save({"state_dict": weights, "epoch": checkpoint["epoch"]}, tmp)


def plot(rows: list[dict], front: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["exchange_bytes"] / 1024 for r in rows], [100 * r["accuracy"] for r in rows], s=12,
               color="0.6", label="policies")
    ax.plot([r["exchange_bytes"] / 1024 for r in front], [100 * r["accuracy"] for r in front], "o-",
            color="C0", label="Pareto front")
    ax.set_xlabel("bytes exchanged mid-network per image (KiB)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--depth", type=int, default=10, help="WRN depth of each branch (default 10)")
    parser.add_argument("--width", type=int, default=1, help="WRN width factor of each branch (default 1)")
    parser.add_argument("--head", action=argparse.BooleanOptionalAction, default=True,
                        help="end each branch in LCP's head, a 1x1 conv + BN + ReLU (method_options.sepnn.head; "
                        "default: on, as the method's)")
    parser.add_argument("--epochs", type=int, default=None, help="default: distill.epochs")
    parser.add_argument("--policies", type=int, default=48, help="random policies ranked beside the fixed ones")
    parser.add_argument("--itemsize", type=int, default=2, help="bytes per exchanged number (2: fp16, default)")
    parser.add_argument("--calibration", type=int, default=2048, help="training images each policy's BatchNorm "
                        "statistics are measured on before it is scored (0: the supernet's mixed statistics)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", type=Path, default=None, help="also copy the record here")
    parser.add_argument("--supernet-out", type=Path, default=None,
                        help="write the supernet's best weights here, for method_options.sepnn.init")
    args = parser.parse_args()
    quiet_known_noise()
    overrides = [f"--{kv.split('=', 1)[0]}={kv.split('=', 1)[1]}" for kv in args.set]
    config = load_config(args.config, ["--trainer.test", "false", "--wandb.mode", "disabled", *overrides])
    losses = build_losses(config["distill"]["losses"])
    if any(loss.reads_maps for loss in losses.values()):
        sys.exit("sepnn_search.py: the supernet trains on logits only; give logit losses, e.g. "
                 "--set 'distill.losses={kd: {alpha: 0.9, temperature: 4.0}}'")
    ctx = Context(config, args.run_dir)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    dm = ctx.datamodule()
    teacher, teacher_sha = load_teacher(ctx, dm)
    torch.manual_seed(config["seed"])
    net = SeparableNet(args.devices, args.depth, args.width, dm.image_shape[0], dm.num_classes, dm.mean, dm.std,
                       head=args.head)
    module = SeparableModule(net, {}, config["distill"]["losses"], config["distill"], dm.num_classes, teacher,
                             config["trainer"]["channels_last"])
    epochs = args.epochs or config["distill"]["epochs"]
    _, checkpoint, _ = fit(ctx, args.run_dir / "supernet", module, dm, epochs, Tracker(config, args.run_dir, "distill"),
                           "distill")
    best = torch.load(checkpoint.best_model_path, weights_only=True)
    module.load_state_dict(best["state_dict"])
    if args.supernet_out is not None:
        write_supernet(best, args.supernet_out)
    policies = candidate_policies(net.num_points, args.devices, args.policies, config["seed"])
    val_images, val_labels = dm.val[0].float().div(255.0), dm.val[1]
    calibration = dm.train[0][:args.calibration].float().div(255.0) if args.calibration else None
    rows = rank_policies(net, val_images, val_labels, policies, args.itemsize, calibration=calibration)
    front = pareto_front(rows)
    per_device = count_params(net) // args.devices  # the classifier is small: shared out evenly for the table
    record = {"command": " ".join(sys.argv), "git_commit": git_commit(), "hardware": hardware(),
              "wall_seconds": round(time.perf_counter() - start, 1), "epochs": epochs, "teacher_sha256": teacher_sha,
              "branches": {"devices": args.devices, "arch": f"wrn_{args.depth}_{args.width}", "head": args.head,
                           "params_per_device": per_device, "point_shapes": net.point_shapes(dm.image_shape)},
              "itemsize": args.itemsize, "losses": config["distill"]["losses"], "split": "validation",
              "batchnorm_calibration_images": args.calibration,
              "rows": rows, "front": front}
    write_json_atomic(args.run_dir / "sepnn_search.json", record)
    plot(rows, front, args.run_dir / "sepnn_search.png",
         f"SepNN search, {args.devices} x wrn_{args.depth}_{args.width}, {config['data']['dataset']}, {epochs} epochs")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.run_dir / "sepnn_search.json", args.out)
    for r in front:
        print(f"{r['exchange_bytes']:>8,} B  {100 * r['accuracy']:.2f}%  {r['policy']}")


if __name__ == "__main__":
    main()
