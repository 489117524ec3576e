"""The run's trained models, rebuilt from its folder: the teacher, the method and its trained devices."""
from __future__ import annotations

from core.io import sha256_file
from distill.checkpoints import CheckpointError, checkpoint_entry, load_weights
from distill.modules import PLAN_KEY
from imagedata.data import ImageDataModule
from methods import METHODS
from methods.base import Setting
from pipeline.context import Context
from students.networks import FeatureClassifier
from students.registry import build_model


def build_teacher(ctx: Context, dm: ImageDataModule) -> FeatureClassifier:
    c, h, w = dm.image_shape
    return build_model(ctx.config["teacher"]["arch"], c, dm.num_classes, dm.mean, dm.std)


def load_teacher(ctx: Context, dm: ImageDataModule) -> tuple[FeatureClassifier, str]:
    """The trained teacher (eval mode) and the sha256 of the checkpoint it came from."""
    path = ctx.teacher_path()
    teacher = build_teacher(ctx, dm)
    load_weights(teacher, path, "model.", f"teacher ({ctx.config['teacher']['arch']})")
    return teacher.eval(), sha256_file(path)


def method_for(ctx: Context, dm: ImageDataModule):
    """The run's method (``method:`` in the config) over its data and trained teacher."""
    teacher, sha = load_teacher(ctx, dm)
    return METHODS[ctx.config["method"]](Setting(ctx.config, dm, teacher, sha, ctx.run_dir))


def load_trained(ctx: Context, dm: ImageDataModule):
    """The method, its trained device model (eval mode) and the plan it was trained on (from its checkpoint,
    so that export never pairs the weights with another plan)."""
    method = method_for(ctx, dm)
    if not method.trains:
        plan = method.plan()
        return method, method.build(plan).eval(), plan
    best = ctx.run_dir / "students" / "best.ckpt"
    if not best.is_file():
        raise CheckpointError(f"{best}: student checkpoint not found; run `nonn distill` (or `nonn run`) first")
    plan = checkpoint_entry(best, PLAN_KEY, "student")
    if plan is None:
        raise CheckpointError(f"{best}: no method plan in it (written by an older version?); "
                              "rerun `nonn distill --force`")
    method.check_plan(plan)
    model = method.build(plan)
    load_weights(model, best, "model.", "student")
    return method, model.eval(), plan
