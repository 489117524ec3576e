"""Stage records: ``<run-dir>/stages/<stage>.json`` with a fingerprint of the config sections the
stage reads and of its upstream stage's outputs, and the checksums of what it wrote. A stage is up to
date only when its fingerprint matches and every output it recorded is on disk unchanged.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

from core.io import sha256_file, write_json_atomic, write_text_atomic
from distill.ranks import is_worker
from pipeline.config import dump_config, select
from pipeline.context import Context

STAGES = ("teacher", "partition", "distill", "export", "evaluate")
UPSTREAM = {"teacher": None, "partition": "teacher", "distill": "partition", "export": "distill",
            "evaluate": "export"}
CONFIG_PARTS = {  # what each stage reads from the config (besides its upstream stage's outputs)
    "teacher": ("seed", "data", "teacher"),
    "partition": ("seed", "data", "method", "partition"),
    "distill": ("seed", "data", "method", "method_options", "distill"),
    "export": ("seed", "data", "method", "method_options", "export"),
    "evaluate": ("seed", "data", "method", "method_options", "evaluate"),
}


# keys that say where a stage keeps a by-product, not what it computes: changing one never makes a stage out of date
PLACES = ("distill.teacher_pool.dir",)


def fingerprint(ctx: Context, stage: str) -> str:
    parts = copy.deepcopy({key: select(ctx.config, key) for key in CONFIG_PARTS[stage]})
    for dotted in PLACES:
        *path, last = dotted.split(".")
        node = parts
        for key in path:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    parts["trainer_limits"] = {k: ctx.config["trainer"][k] for k in ("limit_train_batches", "limit_val_batches")}
    upstream = UPSTREAM[stage]
    if upstream is not None:
        record = read_record(ctx, upstream)
        parts["upstream"] = {k: record[k] for k in ("outputs", "results")} if record else None
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def read_record(ctx: Context, stage: str) -> dict | None:
    path = ctx.stage_record_path(stage)
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except json.JSONDecodeError:
        return None


def is_done(ctx: Context, stage: str) -> bool:
    if stage == "teacher" and ctx.config["teacher"]["checkpoint"]:
        return False  # a teacher trained elsewhere is re-checked (and re-hashed) every time: it is cheap
    record = read_record(ctx, stage)
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


def check_upstream(ctx: Context, stage: str) -> None:
    """Every stage before ``stage`` must be done for the current config, with its outputs intact."""
    upstream = UPSTREAM[stage]
    while upstream is not None:
        if not (upstream == "teacher" and ctx.config["teacher"]["checkpoint"]):  # re-checked when it runs
            record = read_record(ctx, upstream)
            if record is None:
                raise RuntimeError(f"stage '{stage}' needs '{upstream}' first: run `nonn {upstream}` "
                                   f"(or `nonn run`) with the same --run-dir {ctx.run_dir}")
            if not is_done(ctx, upstream):
                raise RuntimeError(f"stage '{upstream}' in {ctx.run_dir} is out of date (its config section or its "
                                   f"inputs or outputs changed since it ran); run `nonn {upstream}` or `nonn run` first")
        upstream = UPSTREAM[upstream]
