"""The pipeline stages behind ``nonn``: teacher -> partition -> distill -> export -> evaluate.

Each stage body is here; what they share lives beside: the run (``context``), stage records and
up-to-date checks (``records``), models rebuilt from the run folder (``loading``), training
(``fitting``). A stage whose record is up to date is skipped unless ``--force``; a training stage
stopped midway resumes from ``last.ckpt``.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import pytorch_lightning as pl
import torch

from bundle.signing import sign_bundle
from core.io import sha256_file
from distill.modules import DistillModule, TeacherModule
from distill.pool import pool_folder, pool_key, prepare_pool, wait_for_pool
from distill.ranks import is_worker, sync_processes
from distill.tracking import Tracker
from imagedata.data import ImageDataModule
from methods import METHODS
from methods.mp import export_teacher_chain
from partitioning import collect_activations, compute_partition
from partitioning.artifacts import write_partition
from pipeline.context import Context
from pipeline.evaluate import evaluate_run
from pipeline.fitting import train_and_test
from pipeline.loading import build_teacher, load_teacher, load_trained, method_for
from pipeline.records import check_upstream, is_done, mark_done, read_record, save_resolved_config

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
    if not ctx.force and is_done(ctx, stage):
        print(f"[nonn] {stage}: up to date in {ctx.run_dir} (use --force to redo)")
        save_resolved_config(ctx)
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
    save_resolved_config(ctx)  # only now: config.yaml describes stages that succeeded under it
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

    if not METHODS[ctx.config["method"]].uses_partition:
        results = {"skipped": f"method {ctx.config['method']} uses no filter partition"}
        print(f"[nonn] partition: {results['skipped']}")
        mark_done(ctx, "partition", [], results)
        return results
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
    """Train the method's devices jointly (a method built from the teacher as it is trains nothing)."""
    dm = ctx.datamodule()
    method = method_for(ctx, dm)
    if not method.trains:
        results = {"trained": False}
        print(f"[nonn] distill: method {method.name} is built from the teacher, nothing to train")
        mark_done(ctx, "distill", [], results)
        return results
    plan = method.plan()
    model = method.build(plan)
    module = method.module(model, plan)
    pool = attach_teacher_pool(ctx, dm, module, method.setting.teacher_sha256)
    best, results = train_and_test(ctx, tracker, "distill", module, dm,
                                    ctx.config["distill"]["epochs"], f"{method.label} ({len(method.device_entries(plan))} devices)")
    results.update(pool)
    mark_done(ctx, "distill", [best], results)
    return results


def attach_teacher_pool(ctx: Context, dm: ImageDataModule, module: DistillModule, teacher_sha256: str) -> dict:
    """With ``distill.teacher_pool.views`` > 0 and a loss that reads the teacher, make training read the
    teacher's stored outputs (built or reused in ``<run>/teacher_pool``, or in the shared
    ``distill.teacher_pool.dir``); returns what the record keeps."""
    pcfg, data = ctx.config["distill"]["teacher_pool"], ctx.config["data"]
    if not pcfg["views"] or module.teacher is None:
        return {"teacher_pool": None}
    start = time.perf_counter()
    key = pool_key(teacher_sha256, *dm.train, module.pool_filters(), pcfg["views"], data["crop_padding"],
                   data["hflip"], pcfg["seed"])
    folder = pool_folder(ctx.run_dir, pcfg["dir"], key)
    if is_worker():  # rank 0 builds; the data-parallel workers read what it wrote
        pool = wait_for_pool(folder, key)
    else:
        # at the training batch size: 128 built 1.4x faster than 512 (benchmarks/bench_pool_build.py, AMD EPYC)
        pool = prepare_pool(folder, key, module.teacher, dm.train[0], data["batch_size"],
                            ctx.config["trainer"]["channels_last"], ctx.progress)
    dm.use_pool(pool)
    return {"teacher_pool": {"views": pool.views, "bytes": pool.nbytes(), "folder": str(folder),
                             "maps": pool.maps is not None, "seconds": round(time.perf_counter() - start, 1)}}


def stage_export(ctx: Context, tracker: Tracker) -> dict:
    """The method's bundle (``export/``) and, unless the method is that split itself, the teacher cut
    layer-wise over as many devices at MAC-balanced points as its baseline (``export_mp/``)."""
    dm = ctx.datamodule()
    method, model, plan = load_trained(ctx, dm)
    calibration = torch.cat([x for x, _ in itertools.islice(dm.val_dataloader(), 4)])
    about = {"run_name": ctx.config["name"], "dataset": ctx.config["data"]["dataset"],
             "teacher_sha256": method.setting.teacher_sha256}
    manifest = method.export(model, plan, ctx.run_dir / "export", calibration, about)
    num_devices = len(manifest["devices"])
    bundles = ["export"]
    if method.mp_baseline:
        export_teacher_chain(method, num_devices, ctx.run_dir / "export_mp", calibration, about)
        bundles.append("export_mp")
    if ctx.config["export"]["sign_key"]:
        for folder in bundles:
            sign_bundle(ctx.run_dir / folder, ctx.config["export"]["sign_key"])
    tracker.log_artifact(ctx.run_dir / "export", f"{ctx.config['name']}-bundle", "model")
    print(f"[nonn] export: {method.label}, {num_devices} devices in {ctx.run_dir / 'export'}"
          + (f", the model-parallel baseline in {ctx.run_dir / 'export_mp'}" if len(bundles) > 1 else ""))
    # every file of every bundle written, so that any edit is seen
    files = sorted(p for d in bundles for p in (ctx.run_dir / d).rglob("*") if p.is_file())
    mark_done(ctx, "export", files, {"devices": num_devices})
    return {"devices": num_devices}


def stage_evaluate(ctx: Context, tracker: Tracker) -> dict:

    return evaluate_run(ctx, tracker)


STAGE_FUNCTIONS: dict[str, Callable[[Context, Tracker], dict]] = {
    "teacher": stage_teacher, "partition": stage_partition, "distill": stage_distill,
    "export": stage_export, "evaluate": stage_evaluate,
}
