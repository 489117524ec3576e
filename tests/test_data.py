import pytest
import torch

from imagedata.augment import augment_batch
from imagedata.data import ImageDataModule, Sampling, TensorBatches
from pipeline.config import load_config
from tests.conftest import TINY


def test_split_is_seeded_and_disjoint(tiny_config):
    cfg = tiny_config["data"]
    a, b = ImageDataModule(cfg, seed=0), ImageDataModule(cfg, seed=0)
    a.setup(), b.setup()
    assert torch.equal(a.val[0], b.val[0]) and torch.equal(a.train[1], b.train[1])
    assert len(a.val[1]) == cfg["val_size"] and len(a.train[1]) == cfg["synthetic"]["train_size"] - cfg["val_size"]
    train_rows = {tuple(x.flatten().tolist()) for x in a.train[0]}
    assert not any(tuple(x.flatten().tolist()) in train_rows for x in a.val[0])
    same_split = ImageDataModule(cfg, seed=1)  # another run seed splits the data as the teacher did
    same_split.setup()
    assert torch.equal(a.val[1], same_split.val[1])
    other = ImageDataModule(dict(cfg, split_seed=1), seed=0)
    other.setup()
    assert not torch.equal(a.val[0], other.val[0])


def test_batches_cover_the_split_in_order_and_shuffle_per_epoch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    labels = torch.arange(10)
    ordered = TensorBatches(images, labels, batch_size=4)
    assert len(ordered) == 3 and torch.cat([y for _, y in ordered]).tolist() == list(range(10))
    x, _ = next(iter(ordered))
    assert x.dtype == torch.float32 and float(x.max()) <= 1.0
    shuffled = TensorBatches(images, labels, batch_size=4, sampling=Sampling(shuffle=True, drop_last=True, seed=3))
    first, second = [torch.cat([y for _, y in shuffled]).tolist() for _ in range(2)]
    assert len(first) == 8 and first != second and len(set(first)) == 8


def test_augment_crops_and_flips_each_image_independently():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    out = augment_batch(x, padding=2, hflip=True, generator=g)
    assert out.shape == x.shape
    same = [torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    assert 0 < sum(same) < 64, "some images keep their position, most are shifted"
    unshifted = augment_batch(x, padding=0, hflip=True, generator=g)
    assert all(torch.equal(unshifted[i], x[i]) or torch.equal(unshifted[i], x[i].flip(-1)) for i in range(64))


def test_normalisation_stats_come_from_the_training_split(tiny_config):
    dm = ImageDataModule(tiny_config["data"], seed=0)
    dm.setup()
    pixels = dm.train[0].float() / 255
    assert abs(dm.mean[0] - float(pixels.mean())) < 1e-5 and abs(dm.std[0] - float(pixels.std())) < 1e-4


def test_data_parallel_ranks_read_disjoint_shards_that_cover_the_data():
    images = torch.zeros(11, 1, 2, 2, dtype=torch.uint8)
    labels = torch.arange(11)
    train = [TensorBatches(images, labels, batch_size=2, sampling=Sampling(True, True, seed=5, rank=r, world=2))
             for r in range(2)]
    seen = [torch.cat([y for _, y in t]).tolist() for t in train]
    assert len(train[0]) == len(train[1]) == 2, "every rank runs the same number of training steps"
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) == len(seen[1]) == 4
    evaluation = [TensorBatches(images, labels, batch_size=4, sampling=Sampling(rank=r, world=2)) for r in range(2)]
    shards = [torch.cat([y for _, y in e]).tolist() for e in evaluation]
    assert sorted(shards[0] + shards[1]) == list(range(11)), "evaluation reads every image exactly once"


def test_a_batch_larger_than_the_training_split_is_refused_naming_the_option():
    """An epoch of zero steps would save no checkpoint and fail later with an unrelated error."""
    config = load_config(TINY, ["--data.batch_size", "1000000000"])
    dm = ImageDataModule(config["data"], config["seed"])
    dm.setup()
    with pytest.raises(ValueError, match="data.batch_size = 1000000000 is more than the 384 training images"):
        dm.train_dataloader()
