"""The pipeline stages behind ``nonn``: teacher -> partition -> distill -> export -> evaluate.

Each stage records ``<run-dir>/stages/<stage>.json`` with a fingerprint of the config sections it
reads and the checksums of its inputs and outputs. A stage whose fingerprint and outputs are
unchanged is skipped unless ``--force``; a training stage stopped midway resumes from ``last.ckpt``.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from distill.checkpoints import checkpoint_entry, checkpoint_epoch, load_weights
from distill.config import dump_config
from distill.data import ImageDataModule
from distill.io import (read_json, restore_interrupted_swap, sha256_file, swap_in, write_json_atomic,
                        write_text_atomic)
from distill.modules import PARTITIONS_KEY, NoNNModule, TeacherModule
from distill.precision import resolve_precision
from distill.ranks import is_worker, sync_processes
from distill.tracking import Tracker, lightning_loggers
from students.networks import FeatureClassifier
from students.registry import build_model
from students.unified import UnifiedStudent

STAGES = ("teacher", "partition", "distill", "export", "evaluate")
UPSTREAM = {"teacher": None, "partition": "teacher", "distill": "partition", "export": "distill",
            "evaluate": "export"}
CONFIG_PARTS = {  # what each stage reads from the config (besides its upstream stage's outputs)
    "teacher": ("seed", "data", "teacher"),
    "partition": ("seed", "data", "partition"),
    "distill": ("seed", "data", "distill"),
    "export": ("seed", "data", "export"),
    "evaluate": ("seed", "data", "evaluate"),
}


@dataclass
class Context:
    config: dict
    run_dir: Path
    force: bool = False

    @property
    def progress(self) -> bool:
        return bool(self.config["trainer"]["progress_bar"])

    def stage_record_path(self, stage: str) -> Path:
        return self.run_dir / "stages" / f"{stage}.json"

    def datamodule(self) -> ImageDataModule:
        dm = ImageDataModule(self.config["data"], self.config["seed"])
        dm.setup()
        return dm

    def teacher_path(self) -> Path:
        given = self.config["teacher"]["checkpoint"]
        return Path(given) if given else self.run_dir / "teacher" / "best.ckpt"


# --- bookkeeping ---------------------------------------------------------------------------

def fingerprint(ctx: Context, stage: str) -> str:
    parts = {key: _select(ctx.config, key) for key in CONFIG_PARTS[stage]}
    parts["trainer_limits"] = {k: ctx.config["trainer"][k] for k in ("limit_train_batches", "limit_val_batches")}
    upstream = UPSTREAM[stage]
    if upstream is not None:
        record = _read_record(ctx, upstream)
        parts["upstream"] = {k: record[k] for k in ("outputs", "results")} if record else None
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _select(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def _read_record(ctx: Context, stage: str) -> dict | None:
    path = ctx.stage_record_path(stage)
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except json.JSONDecodeError:
        return None


def is_done(ctx: Context, stage: str) -> bool:
    if stage == "teacher" and ctx.config["teacher"]["checkpoint"]:
        return False  # a teacher trained elsewhere is re-checked (and re-hashed) every time: it is cheap
    record = _read_record(ctx, stage)
    if record is None or record.get("fingerprint") != fingerprint(ctx, stage):
        return False
    for rel, sha in record["outputs"].items():
        path = ctx.run_dir / rel
        if not path.exists() or sha256_file(path) != sha:
            return False
    return True


def mark_done(ctx: Context, stage: str, outputs: list[Path], results: dict | None = None) -> None:
    if is_worker():
        return
    write_json_atomic(ctx.stage_record_path(stage), {
        "stage": stage,
        "fingerprint": fingerprint(ctx, stage),
        "outputs": {str(p.relative_to(ctx.run_dir)): sha256_file(p) for p in outputs},
        "results": results or {},
    })


def save_resolved_config(ctx: Context) -> None:
    if is_worker():
        return
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(ctx.run_dir / "config.yaml", dump_config(ctx.config))


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


def _check_upstream(ctx: Context, stage: str) -> None:
    """Every stage before ``stage`` must be done for the current config, with its outputs intact."""
    upstream = UPSTREAM[stage]
    while upstream is not None:
        if not (upstream == "teacher" and ctx.config["teacher"]["checkpoint"]):  # re-checked when it runs
            record = _read_record(ctx, upstream)
            if record is None:
                raise RuntimeError(f"stage '{stage}' needs '{upstream}' first: run `nonn {upstream}` "
                                   f"(or `nonn run`) with the same --run-dir {ctx.run_dir}")
            if not is_done(ctx, upstream):
                raise RuntimeError(f"stage '{upstream}' in {ctx.run_dir} is out of date (its config section or its "
                                   f"inputs or outputs changed since it ran); run `nonn {upstream}` or `nonn run` first")
        upstream = UPSTREAM[upstream]


def _run_stage(ctx: Context, stage: str) -> dict:
    _check_upstream(ctx, stage)
    save_resolved_config(ctx)
    if not ctx.force and is_done(ctx, stage):
        print(f"[nonn] {stage}: up to date in {ctx.run_dir} (use --force to redo)")
        return _read_record(ctx, stage)["results"]
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


# --- models from the run folder ------------------------------------------------------------

def build_teacher(ctx: Context, dm: ImageDataModule) -> FeatureClassifier:
    c, h, w = dm.image_shape
    return build_model(ctx.config["teacher"]["arch"], c, dm.num_classes, dm.mean, dm.std)


def load_teacher(ctx: Context, dm: ImageDataModule) -> tuple[FeatureClassifier, str]:
    """The trained teacher (eval mode) and the sha256 of the checkpoint it came from."""
    path = ctx.teacher_path()
    teacher = build_teacher(ctx, dm)
    load_weights(teacher, path, "model.", f"teacher ({ctx.config['teacher']['arch']})")
    return teacher.eval(), sha256_file(path)


def teacher_map_size(teacher: FeatureClassifier, image_shape: tuple[int, int, int]) -> tuple[int, int]:
    with torch.no_grad():
        return tuple(teacher.eval().forward_features(torch.zeros(1, *image_shape)).shape[-2:])


def build_student(ctx: Context, dm: ImageDataModule, teacher: FeatureClassifier, partitions: list[list[int]]):
    return UnifiedStudent.build(ctx.config["distill"]["students"], [len(p) for p in partitions],
                                dm.image_shape[0], dm.num_classes, dm.mean, dm.std,
                                teacher_map_size(teacher, dm.image_shape))


def load_partition(ctx: Context, teacher: FeatureClassifier, teacher_sha: str) -> dict:
    from partitioning.artifacts import read_partition

    return read_partition(ctx.run_dir / "partition" / "partition.json", teacher_sha256=teacher_sha,
                          num_filters=teacher.feature_channels)


def load_student(ctx: Context, dm: ImageDataModule) -> tuple[UnifiedStudent, FeatureClassifier, dict]:
    """The trained students with the filter lists they were trained on (from their checkpoint)."""
    teacher, sha = load_teacher(ctx, dm)
    partition = load_partition(ctx, teacher, sha)
    best = ctx.run_dir / "students" / "best.ckpt"
    trained_on = checkpoint_entry(best, PARTITIONS_KEY, "student")
    if trained_on is not None and trained_on != partition["partitions"]:
        raise RuntimeError(f"{ctx.run_dir / 'partition' / 'partition.json'} no longer lists the filters the students "
                           f"in {best} were trained on; rerun `nonn distill` (or `nonn run`)")
    student = build_student(ctx, dm, teacher, partition["partitions"])
    load_weights(student, best, "student.", "student")
    return student.eval(), teacher, partition


# --- training stages -----------------------------------------------------------------------

def _fit(ctx: Context, stage_dir: Path, module: pl.LightningModule, dm: ImageDataModule, epochs: int,
         tracker: Tracker, stage: str) -> tuple[pl.Trainer, ModelCheckpoint, int]:
    """Fit with best/last checkpoints in ``stage_dir``; resume from last.ckpt if it is this run's.
    Returns the trainer, the best-checkpoint callback and how many epochs this call trained."""
    marker = stage_dir / "fingerprint.txt"
    current = fingerprint(ctx, stage)
    last = stage_dir / "last.ckpt"
    resume = (not ctx.force and last.exists() and marker.exists() and marker.read_text() == current)
    resumed_epoch = checkpoint_epoch(last, f"{stage} last") if resume else None
    sync_processes()  # every process decides on resuming before rank 0 touches the folder
    if not is_worker():  # rank 0 alone prepares the folder
        if not resume and stage_dir.exists():
            shutil.rmtree(stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(marker, current)
    checkpoint = ModelCheckpoint(dirpath=stage_dir, filename="best", monitor="val/acc", mode="max",
                                 save_top_k=1, enable_version_counter=False)
    # every epoch, improved or not, so that a killed run resumes from its true last epoch
    every_epoch = ModelCheckpoint(dirpath=stage_dir, filename="last", monitor=None, save_top_k=1,
                                  enable_version_counter=False)
    tc = ctx.config["trainer"]
    trainer = pl.Trainer(max_epochs=epochs, accelerator=tc["accelerator"], devices=tc["devices"],
                         strategy=tc["strategy"], num_nodes=tc["num_nodes"],
                         precision=resolve_precision(tc["precision"], tc["accelerator"]),
                         deterministic=tc["deterministic"], logger=lightning_loggers(tracker, stage_dir, resumed_epoch),
                         callbacks=[checkpoint, every_epoch], enable_progress_bar=ctx.progress,
                         enable_model_summary=False, limit_train_batches=tc["limit_train_batches"],
                         limit_val_batches=tc["limit_val_batches"], num_sanity_val_steps=0, log_every_n_steps=10,
                         default_root_dir=str(stage_dir))
    if resume:
        print(f"[nonn] {stage}: resuming from {last}")
    trainer.fit(module, datamodule=dm, ckpt_path=str(last) if resume else None)
    return trainer, checkpoint, epochs - (resumed_epoch + 1 if resume else 0)


STAGE_DIRS = {"teacher": "teacher", "distill": "students"}


def _work_dir(ctx: Context, stage: str, final: Path) -> Path:
    """Where a training stage trains: its own folder when that holds a run of this very config (to
    resume) or no finished result; otherwise a folder beside it that replaces it only on success, so
    a changed config or --force never costs the last good result before the new one exists."""
    if not is_worker():
        restore_interrupted_swap(final)
    marker = final / "fingerprint.txt"
    same_run = not ctx.force and marker.exists() and marker.read_text() == fingerprint(ctx, stage)
    if same_run or not (final / "best.ckpt").exists():
        return final
    return final.parent / f".{final.name}.next"


def _train_and_test(ctx: Context, tracker: Tracker, stage: str, module: pl.LightningModule, dm: ImageDataModule,
                    epochs: int, what: str) -> tuple[Path, dict]:
    """Fit, then test the best checkpoint (validation picked it; the test set is only reported)."""
    final = ctx.run_dir / STAGE_DIRS[stage]
    work = _work_dir(ctx, stage, final)
    start = time.perf_counter()
    trainer, checkpoint, fit_epochs = _fit(ctx, work, module, dm, epochs, tracker, stage)
    fit_seconds = time.perf_counter() - start
    tested = trainer.test(module, datamodule=dm, ckpt_path=str(work / "best.ckpt"), verbose=False,
                          weights_only=True)
    if work != final and not is_worker():
        swap_in(work, final)  # the previous result is removed only now that its replacement is complete
    sync_processes()
    best = final / "best.ckpt"
    acc = float(tested[0]["test/acc"])
    tracker.summary({f"{stage}/test_acc": acc})
    print(f"[nonn] {stage}: {what} test accuracy {acc:.4f} ({best})")
    return best, {"test_acc": acc, "best_val_acc": float(checkpoint.best_model_score), "epochs": epochs,
                  "precision": str(trainer.precision), "fit_seconds": round(fit_seconds, 1), "fit_epochs": fit_epochs}


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
    best, results = _train_and_test(ctx, tracker, "teacher", module, dm, tcfg["epochs"], tcfg["arch"])
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
    best, results = _train_and_test(ctx, tracker, "distill", module, dm, dcfg["epochs"],
                                    f"K={len(partitions)} students")
    mark_done(ctx, "distill", [best], results)
    return results


def stage_export(ctx: Context, tracker: Tracker) -> dict:
    from students.export import export_bundle

    dm = ctx.datamodule()
    student, teacher, partition = load_student(ctx, dm)
    calibration = torch.cat([x for x, _ in itertools.islice(dm.val_dataloader(), 4)])
    out_dir = ctx.run_dir / "export"
    ecfg = ctx.config["export"]
    manifest = export_bundle(student, out_dir, image_shape=dm.image_shape, class_names=dm.class_names,
                             partitions=partition["partitions"], calibration_images=calibration,
                             transport=ecfg["transport"], int8_weights=ecfg["int8_weights"], opset=ecfg["opset"],
                             extra={"run_name": ctx.config["name"], "dataset": ctx.config["data"]["dataset"],
                                    "teacher_sha256": partition["teacher_sha256"]})
    tracker.log_artifact(out_dir, f"{ctx.config['name']}-bundle", "model")
    print(f"[nonn] export: {len(manifest['devices'])} devices + aggregator in {out_dir}")
    bundle_files = sorted(p for p in out_dir.rglob("*") if p.is_file())  # every file, so any edit is seen
    mark_done(ctx, "export", bundle_files, {"devices": len(manifest["devices"])})
    return {"devices": len(manifest["devices"])}


def stage_evaluate(ctx: Context, tracker: Tracker) -> dict:
    from distill.evaluate import evaluate_run

    return evaluate_run(ctx, tracker)


STAGE_FUNCTIONS: dict[str, Callable[[Context, Tracker], dict]] = {
    "teacher": stage_teacher, "partition": stage_partition, "distill": stage_distill,
    "export": stage_export, "evaluate": stage_evaluate,
}
