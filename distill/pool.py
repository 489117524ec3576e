"""The teacher-output pool: the frozen teacher's outputs for V seeded augmented views of every training
image, computed once before distillation instead of on every step of every epoch.

The teacher's outputs depend only on the image and its view, so storing each view's parameters (crop
offset, flip) beside the outputs lets a batch show the student exactly the view they belong to (after
Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition", ECCV 2022). The only
approximation is a finite pool: each epoch draws one of the V stored views per image.

On disk (``<run>/teacher_pool/``, memory-mapped .npy files in float16):
- ``params.npy``  int16 [N, V, 3]: (dy, dx, flip) of each view (see :func:`imagedata.augment.draw_views`);
- ``logits.npy``  [N, V, classes];
- ``maps.npy``    [N, V, F, h, w]: the final feature map restricted to the filters the losses read,
  in the order the key lists them (ascending for NoNN, whatever its split); absent when no loss reads maps;
- ``key.json``    what the pool was built from (teacher sha256, data digest, filters, augmentation,
  seed, V) and every file's sha256. A pool whose key differs, or whose files fail their checksum or
  were cut short, is rebuilt, never reused.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from core.io import file_lock, sha256_file, write_json_atomic
from core.signals import sigterm_unwinds
from imagedata.augment import apply_views, draw_views
from students.networks import FeatureClassifier

POOL_VERSION = 1
FILES = ("params", "logits", "maps")


class TeacherTargets(NamedTuple):
    """What the losses read of the teacher for one batch. ``map_filters`` says which teacher filters
    ``fmap``'s channels are: None for the whole map (the live teacher), else the pooled filters."""

    logits: torch.Tensor
    fmap: torch.Tensor | None
    map_filters: list[int] | None


def data_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of the training split as the pool sees it (its images in their order, and labels)."""
    h = hashlib.sha256()
    h.update(str(tuple(images.shape)).encode())
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.contiguous().numpy().tobytes())
    return h.hexdigest()


def pool_key(teacher_sha256: str, images: torch.Tensor, labels: torch.Tensor, filters: list[int] | None,
             views: int, padding: int, hflip: bool, seed: int) -> dict:
    return {"version": POOL_VERSION, "teacher_sha256": teacher_sha256, "data": data_digest(images, labels),
            "filters": filters, "views": views, "crop_padding": padding, "hflip": hflip, "seed": seed}


def pool_folder(run_dir: Path, shared: str | Path | None, key: dict) -> Path:
    """Where a run's pool lives: ``<run>/teacher_pool``, or in a shared folder one per key, so that
    runs whose pools would be identical (another seed, a row with the same teacher outputs) build it once."""
    if shared is None:
        return run_dir / "teacher_pool"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(shared).expanduser() / f"pool-{digest}"


@dataclass
class TeacherPool:
    folder: Path
    params: np.ndarray          # int16 [N, V, 3], memory-mapped
    logits: np.ndarray          # float16 [N, V, classes]
    maps: np.ndarray | None     # float16 [N, V, F, h, w]
    filters: list[int] | None   # the teacher filters ``maps`` holds, in order

    @property
    def views(self) -> int:
        return int(self.params.shape[1])

    def __len__(self) -> int:
        return int(self.params.shape[0])

    def lookup(self, idx: torch.Tensor, views: torch.Tensor) -> tuple[torch.Tensor, TeacherTargets]:
        """View parameters and teacher targets (float32) of images ``idx``, view ``views[i]`` each."""
        rows, cols = idx.numpy(), views.numpy()
        params = torch.from_numpy(self.params[rows, cols].astype(np.int64))
        logits = torch.from_numpy(self.logits[rows, cols].astype(np.float32))
        fmap = None if self.maps is None else torch.from_numpy(self.maps[rows, cols].astype(np.float32))
        return params, TeacherTargets(logits, fmap, self.filters)

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())


def open_pool(folder: Path, key: dict) -> tuple[TeacherPool | None, str]:
    """The pool in ``folder`` if it was built from ``key`` and its files are intact, else (None, why)."""
    try:
        stored = json.loads((folder / "key.json").read_text())
    except FileNotFoundError:
        return None, "no pool yet"
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"its key.json is unreadable ({e})"
    if stored.get("key") != key:
        changed = sorted(k for k in key if stored.get("key", {}).get(k) != key[k])
        return None, f"it was built for another {', '.join(changed) or 'version'}"
    arrays = {}
    for name, digest in stored.get("sha256", {}).items():
        path = folder / f"{name}.npy"
        if not path.exists() or sha256_file(path) != digest:
            return None, f"{path.name} is missing or fails its checksum (cut short or corrupted)"
        try:
            arrays[name] = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            return None, f"{path.name} is unreadable ({e})"
    if "params" not in arrays or "logits" not in arrays:
        return None, "its key.json lists no params or logits"
    return TeacherPool(folder, arrays["params"], arrays["logits"], arrays.get("maps"), key["filters"]), ""


def build_pool(folder: Path, key: dict, teacher: FeatureClassifier, images: torch.Tensor, batch_size: int,
               channels_last: bool, progress: bool) -> TeacherPool:
    """Run the teacher over V seeded views of every image; the folder appears only once complete."""
    teacher = teacher.eval()
    if channels_last:  # as training will have it: a channels_last input into NCHW weights ran 1.4x slower
        # outside inference mode: converted there, the teacher's tensors would become inference tensors, and
        # loading a checkpoint into the module (the test pass reloads the best one) would fail
        teacher = teacher.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        return _build(folder, key, teacher, images, batch_size, channels_last, progress)


def _build(folder: Path, key: dict, teacher: FeatureClassifier, images: torch.Tensor, batch_size: int,
           channels_last: bool, progress: bool) -> TeacherPool:
    n, views, filters = len(images), key["views"], key["filters"]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".building", dir=folder.parent))
    try:
        probe = teacher.forward_features(images[:1].float().div(255))
        classes = teacher.fc.out_features
        out = {"params": np.lib.format.open_memmap(tmp / "params.npy", "w+", np.int16, (n, views, 3)),
               "logits": np.lib.format.open_memmap(tmp / "logits.npy", "w+", np.float16, (n, views, classes))}
        if filters is not None:
            out["maps"] = np.lib.format.open_memmap(tmp / "maps.npy", "w+", np.float16,
                                                    (n, views, len(filters), *probe.shape[2:]))
        select = None if filters is None else torch.tensor(filters, dtype=torch.long)
        with tqdm(total=n * views, desc="teacher pool", unit="img", disable=not progress) as bar:
            for v in range(views):
                g = torch.Generator().manual_seed(key["seed"] * 1_000_003 + v)
                for start in range(0, n, batch_size):
                    x = images[start:start + batch_size].float().div_(255.0)
                    params = draw_views(len(x), key["crop_padding"], key["hflip"], g)
                    x = apply_views(x, params, key["crop_padding"])
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    fmap = teacher.forward_features(x)
                    rows = slice(start, start + len(x))
                    out["params"][rows, v] = params.numpy()
                    out["logits"][rows, v] = teacher.fc(fmap.mean(dim=(2, 3))).half().numpy()
                    if select is not None:  # torch casts to fp16 contiguously, ~5x faster than numpy into the memmap
                        out["maps"][rows, v] = fmap.index_select(1, select).half().contiguous().numpy()
                    bar.update(len(x))
        for array in out.values():
            array.flush()
        del out
        sums = {name: sha256_file(tmp / f"{name}.npy") for name in FILES if (tmp / f"{name}.npy").exists()}
        write_json_atomic(tmp / "key.json", {"key": key, "sha256": sums})
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pool, why = open_pool(folder, key)
    if pool is None:
        raise RuntimeError(f"{folder}: the pool just built does not open ({why}); delete the folder and retry")
    return pool


def prepare_pool(folder: Path, key: dict, teacher: FeatureClassifier, images: torch.Tensor, batch_size: int,
                 channels_last: bool, progress: bool) -> TeacherPool:
    """Reuse the pool in ``folder`` if it matches ``key``, else (re)build it, saying why. One process
    builds a folder at a time: a second one waits for it and then reuses its pool (two rows started side by
    side over one shared folder), and the builder that holds the lock removes what dead builders left."""
    def busy(holder: str) -> None:
        print(f"[nonn] teacher pool: waiting for PID {holder}, which is building {folder}")

    with file_lock(folder.parent / f".{folder.name}.lock", busy):
        pool, why = open_pool(folder, key)
        if pool is not None:
            print(f"[nonn] teacher pool: reusing {folder} ({pool.views} views, {pool.nbytes() / 2**20:.0f} MiB)")
            return pool
        for abandoned in folder.parent.glob(f".{folder.name}.*.building"):  # killed mid-build (even SIGKILL)
            shutil.rmtree(abandoned, ignore_errors=True)
            print(f"[nonn] teacher pool: removed {abandoned}, a build that was killed")
        print(f"[nonn] teacher pool: building {folder} ({why}): {key['views']} views of {len(images)} images")
        with sigterm_unwinds():  # a killed build removes its half-written folder (gigabytes on CIFAR-10)
            return build_pool(folder, key, teacher, images, batch_size, channels_last, progress)


def wait_for_pool(folder: Path, key: dict, timeout_s: float = 4 * 3600, poll_s: float = 2.0) -> TeacherPool:
    """A data-parallel worker's pool: the one rank 0 builds (or reuses) in ``folder``, once it matches
    ``key``. Every rank then reads the same memory-mapped files, each only the pages of its own shard."""
    deadline = time.monotonic() + timeout_s
    while True:
        pool, why = open_pool(folder, key)
        if pool is not None:
            return pool
        if time.monotonic() > deadline:
            raise RuntimeError(f"{folder}: rank 0 did not finish the teacher pool within {timeout_s:.0f} s ({why}); "
                               "check rank 0's output")
        time.sleep(poll_s)
