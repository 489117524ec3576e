"""In-memory data modules: whole splits as uint8 tensors, batches augmented with tensor ops.

On a 2-core machine per-image Python workers would starve the model; here one batch costs a few
vectorised tensor operations (see benchmarks/README.md for loader vs training-step throughput).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytorch_lightning as pl
import torch

from imagedata.augment import apply_views, augment_batch
from imagedata.datasets import RawSplits, load_raw


class StoredViews(Protocol):
    """Per training image, V stored augmented views and what belongs to each (the distillation's teacher
    pool): batches show the stored view and carry its targets."""

    folder: Path

    @property
    def views(self) -> int: ...

    def __len__(self) -> int: ...

    def lookup(self, idx: torch.Tensor, views: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(view parameters [n, 3] as :func:`imagedata.augment.draw_views` makes them, the views' targets)."""
        ...


@dataclass(frozen=True)
class Sampling:
    """Which images an epoch reads and in what order: shuffled (by ``seed`` and the epoch) or in order,
    the last partial batch dropped or kept, and this process's shard under data parallelism (process
    ``rank`` of ``world``)."""

    shuffle: bool = False
    drop_last: bool = False
    seed: int = 0
    rank: int = 0
    world: int = 1


class TensorBatches:
    """An iterable of (images in [0, 1], labels) batches over tensors held in memory; with a teacher
    ``pool``, (images, labels, teacher targets) batches of the pool's stored views.

    Under data-parallel training (``world`` processes) process ``rank`` reads only its own shard,
    every ``world``-th image of the (shuffled) order, as a DistributedSampler would; all ranks
    shuffle with the same seed, so the shards are disjoint and cover the data.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, sampling: Sampling = Sampling(),
                 padding: int = 0, hflip: bool = False, pool: StoredViews | None = None) -> None:
        if not 0 <= sampling.rank < sampling.world:
            raise ValueError(f"rank {sampling.rank} outside a world of {sampling.world} processes")
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.shuffle, self.drop_last, self.seed = sampling.shuffle, sampling.drop_last, sampling.seed
        self.rank, self.world = sampling.rank, sampling.world
        self.padding, self.hflip = padding, hflip
        self.epoch = 0
        self.pool = pool

    def _shard_size(self) -> int:
        n = len(self.labels)
        # training (drop_last) gives every rank the same number of batches, so no rank waits on another
        return n // self.world if self.drop_last else len(range(self.rank, n, self.world))

    def __len__(self) -> int:
        n = self._shard_size()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Read epoch ``epoch``'s order and views next: a run resumed at epoch k sees what an uninterrupted
        one saw. (``__iter__`` is a generator: nothing is drawn until the first batch is asked for.)"""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1  # iterated again without set_epoch (outside a Trainer): the next epoch's order
        order = torch.randperm(len(self.labels), generator=g) if self.shuffle else torch.arange(len(self.labels))
        order = order[self.rank::self.world][: self._shard_size()]
        augment = self.padding > 0 or self.hflip
        for b in range(len(self)):
            idx = order[b * self.batch_size: (b + 1) * self.batch_size]
            x = self.images[idx].float().div_(255.0)
            if self.pool is not None:  # one stored view per image, with the teacher's outputs for it
                params, targets = self.pool.lookup(idx, torch.randint(0, self.pool.views, (len(idx),), generator=g))
                yield apply_views(x, params, self.padding), self.labels[idx], targets
                continue
            if augment:
                x = augment_batch(x, self.padding, self.hflip, g)
            yield x, self.labels[idx]


class ImageDataModule(pl.LightningDataModule):
    """Train / validation (seeded split of the training set) / test, for every dataset we support."""

    def __init__(self, data_cfg: dict, seed: int) -> None:
        super().__init__()
        self.cfg, self.seed = data_cfg, seed
        self.raw: RawSplits | None = None
        self.pool: StoredViews | None = None  # training batches come with the teacher's stored outputs

    def use_pool(self, pool: StoredViews | None) -> None:
        if pool is not None and len(pool) != len(self.train[1]):
            raise ValueError(f"{pool.folder} holds {len(pool)} images, the training split {len(self.train[1])}")
        self.pool = pool

    def setup(self, stage: str | None = None) -> None:
        if self.raw is not None:
            return
        raw = load_raw(self.cfg, int(self.cfg["split_seed"]))  # the data config alone fixes the data
        n = len(raw.train_labels)
        if raw.val_images is not None:  # the data set's own validation split (data.val_size does not apply)
            train_idx = torch.arange(n)
            self.val = (raw.val_images, raw.val_labels)
        else:
            val_size = int(self.cfg["val_size"])
            if not 0 < val_size < n:
                raise ValueError(f"data.val_size = {val_size} must be between 1 and {n - 1} (training set size - 1)")
            order = torch.randperm(n, generator=torch.Generator().manual_seed(int(self.cfg["split_seed"])))
            val_idx, train_idx = order[:val_size], order[val_size:]
            self.val = (raw.train_images[val_idx], raw.train_labels[val_idx])
        if self.cfg["train_subset"]:
            train_idx = train_idx[: int(self.cfg["train_subset"])]
        self.train = (raw.train_images[train_idx], raw.train_labels[train_idx])
        test_n = self.cfg["test_subset"] or len(raw.test_labels)
        self.test = (raw.test_images[:test_n], raw.test_labels[:test_n])
        pixels = self.train[0].float().div(255.0)
        self.mean = pixels.mean(dim=(0, 2, 3)).tolist()
        self.std = pixels.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
        self.raw = raw

    @property
    def class_names(self) -> list[str]:
        return self.raw.class_names

    @property
    def num_classes(self) -> int:
        return len(self.raw.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.raw.train_images.shape[1:])

    def _shard(self) -> dict:
        """This process's place among the data-parallel processes (rank 0 of 1 outside a Trainer)."""
        trainer = self.trainer
        return {"rank": trainer.global_rank, "world": trainer.world_size} if trainer is not None else {}

    def train_dataloader(self) -> TensorBatches:
        sampling = Sampling(shuffle=True, drop_last=True, seed=self.seed, **self._shard())
        batches = TensorBatches(*self.train, self.cfg["batch_size"], sampling, padding=self.cfg["crop_padding"],
                                hflip=self.cfg["hflip"], pool=self.pool)
        if len(batches) == 0:  # an epoch of no steps would train nothing and save no checkpoint
            per_process = batches._shard_size()
            raise ValueError(f"data.batch_size = {self.cfg['batch_size']} is more than the {per_process} training "
                             f"images each training process reads; choose at most {per_process}")
        return batches

    def val_dataloader(self) -> TensorBatches:
        return TensorBatches(*self.val, self.cfg["eval_batch_size"], Sampling(**self._shard()))

    def test_dataloader(self) -> TensorBatches:
        return TensorBatches(*self.test, self.cfg["eval_batch_size"], Sampling(**self._shard()))
