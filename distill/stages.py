"""The pipeline stages behind ``nonn``: teacher -> partition -> distill -> export -> evaluate.

Each stage body is here; what they share lives beside: the run (``context``), stage records and
up-to-date checks (``records``), models rebuilt from the run folder (``loading``), training
(``fitting``). A stage whose record is up to date is skipped unless ``--force``; a training stage
stopped midway resumes from ``last.ckpt``.
"""
from __future__ import annotations

import itertools
import time
from typing import Callable

import pytorch_lightning as pl
import torch

from distill.context import Context
from distill.fitting import train_and_test
from distill.io import sha256_file
from distill.loading import build_student, build_teacher, load_partition, load_student, load_teacher
from distill.modules import NoNNModule, TeacherModule
from distill.ranks import is_worker, sync_processes
from distill.records import check_upstream, is_done, mark_done, read_record, save_resolved_config
from distill.tracking import Tracker


TRAINING_STAGES = ("teacher", "distill")


def run_stage(ctx: Context, stage: str) -> dict:
    """Run one stage unless it is already done with the same inputs; returns its record's results."""
    try:
        return _run_stage(ctx, stage) if not is_worker() else _join_stage(ctx, stage)
    finally:
        sync_processes()


def _join_stage(ctx: Context, stage: str) -> dict:
    """A data-parallel worker (rank > 0): take part in the fit and test of a training stage that is
    not done yet; rank 0 does everything else."""
    trains = stage in TRAINING_STAGES and not (stage == "teacher" and ctx.config["teacher"]["checkpoint"])
    if trains and (ctx.force or not is_done(ctx, stage)):
        STAGE_FUNCTIONS[stage](ctx, Tracker(ctx.config, ctx.run_dir, stage))
    return {}


def _run_stage(ctx: Context, stage: str) -> dict:
    check_upstream(ctx, stage)
    save_resolved_config(ctx)
    if not ctx.force and is_done(ctx, stage):
        print(f"[nonn] {stage}: up to date in {ctx.run_dir} (use --force to redo)")
        return read_record(ctx, stage)["results"]
    print(f"[nonn] {stage}: running in {ctx.run_dir}")
    pl.seed_everything(ctx.config["seed"], workers=True, verbose=False)
    if ctx.config["trainer"]["num_threads"]:
        torch.set_num_threads(int(ctx.config["trainer"]["num_threads"]))
    tracker = Tracker(ctx.config, ctx.run_dir, stage)
    start = time.perf_counter()
    try:
        results = STAGE_FUNCTIONS[stage](ctx, tracker)
    finally:
        tracker.finish()
    print(f"[nonn] {stage}: done in {time.perf_counter() - start:.0f} s")
    return results


def stage_teacher(ctx: Context, tracker: Tracker) -> dict:
    dm = ctx.datamodule()
    given = ctx.config["teacher"]["checkpoint"]
    if given:  # a teacher trained elsewhere: check it loads, record its checksum
        teacher, sha = load_teacher(ctx, dm)
        results = {"teacher_sha256": sha, "source": str(given)}
        mark_done(ctx, "teacher", [], results)
        return results
    tcfg = ctx.config["teacher"]
    module = TeacherModule(build_teacher(ctx, dm), tcfg, dm.num_classes, ctx.config["trainer"]["channels_last"])
    best, results = train_and_test(ctx, tracker, "teacher", module, dm, tcfg["epochs"], tcfg["arch"])
    results["teacher_sha256"] = sha256_file(best)
    mark_done(ctx, "teacher", [best], results)
    return results


def stage_partition(ctx: Context, tracker: Tracker) -> dict:
    from partitioning import collect_activations, compute_partition
    from partitioning.artifacts import write_partition

    dm = ctx.datamodule()
    teacher, sha = load_teacher(ctx, dm)
    pcfg = ctx.config["partition"]
    acts = collect_activations(teacher, dm.val_dataloader(), pcfg["pooling"], pcfg["max_images"], ctx.progress)
    result = compute_partition(acts, pcfg, ctx.config["seed"])
    out_dir = ctx.run_dir / "partition"
    meta = {"num_images": int(acts.shape[0]), "teacher_arch": ctx.config["teacher"]["arch"],
            "teacher_layer": teacher.feature_layer, "teacher_sha256": sha, "dataset": ctx.config["data"]["dataset"]}
    info = write_partition(out_dir, result.groups, result.weights, result.graph, result.communities,
                           result.modularity, pcfg, meta)
    tracker.log({"partition/sizes": info["sizes"], "partition/modularity": info["modularity"]})
    tracker.log_image("partition/graph", out_dir / "partition.png")
    print(f"[nonn] partition: {pcfg['mode']} K={pcfg['num_students']} sizes {info['sizes']} "
          f"modularity {info['modularity']:.3f} from {acts.shape[0]} images")
    results = {"sizes": info["sizes"], "modularity": info["modularity"]}
    mark_done(ctx, "partition", [out_dir / "partition.json"], results)
    return results


def stage_distill(ctx: Context, tracker: Tracker) -> dict:
    dm = ctx.datamodule()
    teacher, sha = load_teacher(ctx, dm)
    partitions = load_partition(ctx, teacher, sha)["partitions"]
    dcfg = ctx.config["distill"]
    student = build_student(ctx, dm, teacher, partitions)
    module = NoNNModule(teacher, student, partitions, dcfg["losses"], dcfg, dm.num_classes,
                        dcfg["student_dropout"], ctx.config["trainer"]["channels_last"])
    best, results = train_and_test(ctx, tracker, "distill", module, dm, dcfg["epochs"],
                                    f"K={len(partitions)} students")
    mark_done(ctx, "distill", [best], results)
    return results


def stage_export(ctx: Context, tracker: Tracker) -> dict:
    """The NoNN bundle (``export/``) and, as its baseline, the teacher cut layer-wise over as many
    devices at MAC-balanced points (model parallelism, ``export_mp/``)."""
    from students.export import export_bundle, export_chain
    from students.model_parallel import split_modules

    dm = ctx.datamodule()
    student, teacher, partition = load_student(ctx, dm)
    calibration = torch.cat([x for x, _ in itertools.islice(dm.val_dataloader(), 4)])
    ecfg = ctx.config["export"]
    about = {"run_name": ctx.config["name"], "dataset": ctx.config["data"]["dataset"],
             "teacher_sha256": partition["teacher_sha256"]}
    manifest = export_bundle(student, ctx.run_dir / "export", image_shape=dm.image_shape,
                             class_names=dm.class_names, partitions=partition["partitions"],
                             calibration_images=calibration, transport=ecfg["transport"],
                             int8_weights=ecfg["int8_weights"], opset=ecfg["opset"], extra=about)
    num_devices = len(manifest["devices"])
    export_chain(split_modules(teacher, num_devices, dm.image_shape), ctx.run_dir / "export_mp",
                 image_shape=dm.image_shape, class_names=dm.class_names, calibration_images=calibration,
                 opset=ecfg["opset"], extra={**about, "method": "mp", "teacher_arch": ctx.config["teacher"]["arch"]})
    tracker.log_artifact(ctx.run_dir / "export", f"{ctx.config['name']}-bundle", "model")
    print(f"[nonn] export: {num_devices} devices + aggregator in {ctx.run_dir / 'export'}, "
          f"the model-parallel baseline in {ctx.run_dir / 'export_mp'}")
    # every file of both bundles, so that any edit is seen
    files = sorted(p for d in ("export", "export_mp") for p in (ctx.run_dir / d).rglob("*") if p.is_file())
    mark_done(ctx, "export", files, {"devices": num_devices})
    return {"devices": num_devices}


def stage_evaluate(ctx: Context, tracker: Tracker) -> dict:
    from distill.evaluate import evaluate_run

    return evaluate_run(ctx, tracker)


STAGE_FUNCTIONS: dict[str, Callable[[Context, Tracker], dict]] = {
    "teacher": stage_teacher, "partition": stage_partition, "distill": stage_distill,
    "export": stage_export, "evaluate": stage_evaluate,
}
