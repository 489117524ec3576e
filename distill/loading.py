"""The run's trained models, rebuilt from its folder: the teacher, the partition, the students."""
from __future__ import annotations

import torch

from distill.checkpoints import checkpoint_entry, load_weights
from distill.context import Context
from distill.data import ImageDataModule
from distill.io import sha256_file
from distill.modules import PARTITIONS_KEY
from students.networks import FeatureClassifier
from students.registry import build_model
from students.unified import UnifiedStudent


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
