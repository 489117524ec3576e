"""Image-folder data sets on small folders and zips the tests write: layout, labels, caching, errors."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagedata import imagefolder
from imagedata.datasets import DataError, load_cifar, load_raw
from imagedata.imagefolder import read_image_folder

CLASSES = ("dog", "cat", "bird")  # written in this order; labels follow the sorted names: bird 0, cat 1, dog 2


@pytest.fixture(autouse=True)
def private_user_cache(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(imagefolder, "USER_CACHE", tmp_path / "user_cache")


def pixels(label: int, index: int, size: int = 8, channels: int = 3) -> np.ndarray:
    """A distinct, exactly storable image (PNG is lossless) per class and index."""
    value = np.full((size, size, channels), (25 * label + 3 * index) % 256, dtype=np.uint8)
    value[0, 0] = index
    return value[..., 0] if channels == 1 else value


def write_folder(root: Path, splits: dict[str, int] | None = None, classes: tuple[str, ...] = CLASSES,
                 size: int = 8, channels: int = 3) -> Path:
    """root/<split>/<class>/<i>.png with ``splits[split]`` images per class."""
    for split, per_class in (splits or {"train": 3, "test": 2}).items():
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(pixels(sorted(classes).index(cls), i, size, channels)).save(folder / f"{i}.png")
    return root


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                z.write(path, prefix + path.relative_to(folder).as_posix())
    return archive


def data_cfg(path: Path, dataset: str = "imagefolder") -> dict:
    return {"dataset": dataset, "data_dir": str(path), "download": False}


def test_folder_gives_sorted_class_labels_and_exact_pixels(tmp_path: Path):
    raw = load_raw(data_cfg(write_folder(tmp_path / "data")), 0)
    assert raw.class_names == ["bird", "cat", "dog"]
    assert raw.train_images.shape == (9, 3, 8, 8) and raw.test_images.shape == (6, 3, 8, 8)
    assert raw.train_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    np.testing.assert_array_equal(raw.train_images[4].numpy().transpose(1, 2, 0), pixels(1, 1))
    assert raw.val_images is None  # no val/ folder: the data module splits one off the training set


def test_zip_one_folder_down_equals_the_folder_and_val_split_is_used(tmp_path: Path):
    folder = write_folder(tmp_path / "data", {"train": 2, "val": 1, "test": 1}, channels=1)
    from_folder = read_image_folder(folder)
    from_zip = read_image_folder(zip_folder(folder, tmp_path / "set.zip", prefix="mydata/"))
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(from_zip.images[split], from_folder.images[split])
        np.testing.assert_array_equal(from_zip.labels[split], from_folder.labels[split])
    assert from_zip.images["val"].shape == (3, 1, 8, 8)

    from imagedata.data import ImageDataModule

    dm = ImageDataModule({**data_cfg(tmp_path / "set.zip"), "split_seed": 0, "val_size": 5000, "train_subset": None,
                          "test_subset": None}, seed=0)
    dm.setup()
    assert len(dm.train[1]) == 6 and len(dm.val[1]) == 3, "val/ is the validation split; data.val_size is not used"


def test_decoded_once_then_read_from_the_cache_and_redecoded_when_the_source_changes(tmp_path: Path, monkeypatch):
    folder = write_folder(tmp_path / "data")
    archive = zip_folder(folder, tmp_path / "set.zip")
    first = read_image_folder(archive)
    caches = list(tmp_path.glob(".set.zip.*.npz"))
    assert len(caches) == 1, "the cache lies beside a source in a writable folder"

    def no_decoding(*args):
        raise AssertionError("decoded again although the cache matches")
    monkeypatch.setattr(imagefolder, "_decode", no_decoding)
    np.testing.assert_array_equal(read_image_folder(archive).images["train"], first.images["train"])
    monkeypatch.undo()

    Image.fromarray(pixels(0, 0) + 1).save(folder / "train" / "bird" / "0.png")
    zip_folder(folder, archive)  # the source changed: a new sha256, a new cache
    changed = read_image_folder(archive)
    assert not np.array_equal(changed.images["train"][0], first.images["train"][0])
    assert len(list(tmp_path.glob(".set.zip.*.npz"))) == 2


def test_a_cut_short_cache_is_decoded_again(tmp_path: Path):
    archive = zip_folder(write_folder(tmp_path / "data"), tmp_path / "set.zip")
    expected = read_image_folder(archive).images["test"]
    cache = next(tmp_path.glob(".set.zip.*.npz"))
    cache.write_bytes(cache.read_bytes()[:1000])
    np.testing.assert_array_equal(read_image_folder(archive).images["test"], expected)


def test_read_only_source_folder_caches_in_the_user_cache(tmp_path: Path):
    (tmp_path / "ro").mkdir()
    archive = zip_folder(write_folder(tmp_path / "data"), tmp_path / "ro" / "set.zip")
    (tmp_path / "ro").chmod(0o555)  # read-only even for root, who could still write it
    try:
        read_image_folder(archive)
        assert not list((tmp_path / "ro").glob(".*.npz"))
        assert len(list((tmp_path / "user_cache").glob(".set.zip.*.npz"))) == 1
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_cifar10_reads_an_image_folder_copy_and_checks_its_shape(tmp_path: Path):
    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    archive = zip_folder(write_folder(tmp_path / "c10", {"train": 1, "test": 1}, classes, size=32),
                         tmp_path / "cifar10.zip", prefix="cifar10/")
    raw = load_cifar("cifar10", archive, allow_download=False)
    assert raw.class_names == list(classes) and raw.train_images.shape == (10, 3, 32, 32)
    with pytest.raises(DataError, match="3 classes .* but cifar10 has 10 classes .* data.dataset: imagefolder"):
        load_cifar("cifar10", write_folder(tmp_path / "three", size=32), allow_download=False)


@pytest.mark.parametrize("breakage,message", [
    ("missing_class", r"class folder 'dog' is in train/ but not in test/"),
    ("extra_class", r"class folder 'fox' is in test/ but not in train/"),
    ("empty_class", r"class folder train/cat/ holds no images"),
    ("unreadable", r"cannot read image train/cat/1.png"),
    ("mixed_size", r"test/dog/0.png has size 9x8 with 3 channels but train/bird/0.png has 8x8 with 3 channels"),
    ("mixed_channels", r"test/dog/0.png has channels 8x8 with 1 channel but train/bird/0.png has 8x8 with 3"),
    ("no_layout", r"no train/ and test/ folders"),
    ("loose_file", r"train/stray.png is not in a class folder"),
])
def test_broken_folders_are_one_line_errors_naming_the_file(tmp_path: Path, breakage: str, message: str):
    root = write_folder(tmp_path / "data")
    if breakage == "missing_class":
        for f in (root / "test" / "dog").iterdir():
            f.unlink()
        (root / "test" / "dog").rmdir()
    elif breakage == "extra_class":
        write_folder(root, {"test": 1}, ("fox",))
    elif breakage == "empty_class":
        for f in (root / "train" / "cat").iterdir():
            f.unlink()
    elif breakage == "unreadable":
        (root / "train" / "cat" / "1.png").write_bytes(b"not a png")
    elif breakage in ("mixed_size", "mixed_channels"):
        size, channels = (9, 3) if breakage == "mixed_size" else (8, 1)
        image = np.zeros((8, size, channels), dtype=np.uint8)
        Image.fromarray(image[..., 0] if channels == 1 else image).save(root / "test" / "dog" / "0.png")
    elif breakage == "no_layout":
        (root / "test").rename(root / "testing")
    elif breakage == "loose_file":
        Image.fromarray(pixels(0, 0)).save(root / "train" / "stray.png")
    with pytest.raises(DataError, match=message) as info:
        load_raw(data_cfg(root), 0)
    assert "\n" not in str(info.value)
    assert not list(tmp_path.glob("**/*.npz")), "a failed read leaves no cache behind"


def test_imagefolder_needs_a_data_dir(tmp_path: Path):
    with pytest.raises(DataError, match="imagefolder needs data.data_dir"):
        load_raw({"dataset": "imagefolder", "data_dir": None, "download": False}, 0)
    with pytest.raises(DataError, match="not found"):
        load_raw(data_cfg(tmp_path / "nowhere"), 0)
