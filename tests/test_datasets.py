"""Raw readers on files the tests write: IDX (Fashion-MNIST format), CIFAR tarballs, checksummed downloads."""
from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from distill import datasets
from distill.datasets import DataError, download, load_cifar, load_fashion_mnist, read_idx


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def write_fashion_files(folder: Path, n_train: int = 12, n_test: int = 5) -> dict:
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (n_train, 28, 28)), "train_labels": rng.integers(0, 10, n_train),
              "test_images": rng.integers(0, 256, (n_test, 28, 28)), "test_labels": rng.integers(0, 10, n_test)}
    folder.mkdir(parents=True, exist_ok=True)
    for key, (name, _) in datasets.FASHION_MNIST_FILES.items():
        write_idx(folder / name, arrays[key])
    return arrays


def test_idx_roundtrip_gz_and_plain(tmp_path: Path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for gz, name in ((True, "a.gz"), (False, "a.idx")):
        write_idx(tmp_path / name, array, gz=gz)
        np.testing.assert_array_equal(read_idx(tmp_path / name), array)


def test_idx_bad_magic_and_truncated(tmp_path: Path):
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "bad.idx")
    write_idx(tmp_path / "t.idx", np.zeros((4, 4), dtype=np.uint8), gz=False)
    (tmp_path / "t.idx").write_bytes((tmp_path / "t.idx").read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "t.idx")


def test_fashion_mnist_from_data_dir(tmp_path: Path):
    arrays = write_fashion_files(tmp_path)
    raw = load_fashion_mnist(tmp_path, allow_download=False)
    assert raw.train_images.shape == (12, 1, 28, 28) and raw.test_images.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(raw.train_labels.numpy(), arrays["train_labels"])
    np.testing.assert_array_equal(raw.test_images[:, 0].numpy(), arrays["test_images"])
    assert raw.class_names[9] == "Ankle boot"


def test_fashion_mnist_missing_offline_says_how_to_get_it(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "empty", allow_download=False)


def test_fashion_mnist_download_checks_sha256(tmp_path: Path, monkeypatch):
    """The real download path, served from file:// URLs of files the test writes."""
    source = tmp_path / "mirror"
    write_fashion_files(source)
    sums = {k: (name, hashlib.sha256((source / name).read_bytes()).hexdigest())
            for k, (name, _) in datasets.FASHION_MNIST_FILES.items()}
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(datasets, "FASHION_MNIST_URL", source.as_uri() + "/")
    monkeypatch.setattr(datasets, "FASHION_MNIST_FILES", sums)
    raw = load_fashion_mnist(tmp_path / "dl", allow_download=True)
    assert raw.train_images.shape[0] == 12 and (tmp_path / "dl" / sums["train_images"][0]).exists()

    corrupt = dict(sums, test_labels=(sums["test_labels"][0], "0" * 64))
    monkeypatch.setattr(datasets, "FASHION_MNIST_FILES", corrupt)
    with pytest.raises(DataError, match="sha256"):
        load_fashion_mnist(tmp_path / "dl2", allow_download=True)
    assert not (tmp_path / "dl2" / sums["test_labels"][0]).exists(), "a failed download leaves no file behind"


def test_download_unreachable_is_a_clear_error(tmp_path: Path):
    with pytest.raises(DataError, match="could not download"):
        download((tmp_path / "missing.bin").as_uri(), tmp_path / "out.bin", "0" * 64)


def write_cifar_tarball(root: Path, name: str, n_per_batch: int = 4) -> tuple[Path, np.ndarray]:
    _, _, folder, label_key, train_members, test_member, (meta, names_key) = datasets.CIFAR_ARCHIVES[name]
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / datasets.CIFAR_ARCHIVES[name][0]
    first = None
    with tarfile.open(archive, "w:gz") as tar:
        def add(member: str, obj: dict) -> None:
            blob = pickle.dumps(obj)
            info = tarfile.TarInfo(f"{folder}/{member}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        for member in [*train_members, test_member]:
            data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
            first = data if first is None else first
            add(member, {b"data": data, label_key: rng.integers(0, 10, n_per_batch).tolist()})
        add(meta, {names_key: [f"c{i}".encode() for i in range(10)]})
    return archive, first


@pytest.mark.parametrize("name,n_train", [("cifar10", 20), ("cifar100", 4)])
def test_cifar_from_tarball(tmp_path: Path, name: str, n_train: int):
    _, first = write_cifar_tarball(tmp_path, name)
    raw = load_cifar(name, tmp_path, allow_download=False)
    assert raw.train_images.shape == (n_train, 3, 32, 32) and raw.test_images.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(raw.train_images[0].numpy().reshape(-1), first[0])
    assert raw.class_names[:2] == ["c0", "c1"]


def test_cifar_missing_offline_and_corrupt(tmp_path: Path):
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        load_cifar("cifar10", tmp_path, allow_download=False)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(DataError, match="corrupt"):
        load_cifar("cifar10", tmp_path, allow_download=False)


def test_corrupt_deflate_stream_is_a_one_line_error(tmp_path: Path):
    write_idx(tmp_path / "c.gz", np.zeros((64, 64), dtype=np.uint8))
    data = bytearray((tmp_path / "c.gz").read_bytes())
    data[12:20] = b"\xff" * 8  # inside the deflate stream, past the gzip header
    (tmp_path / "c.gz").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"c.gz: unreadable IDX file"):
        read_idx(tmp_path / "c.gz")


def test_labels_out_of_range_and_empty_data_dir_are_refused_when_read(tmp_path: Path):
    from distill.datasets import load_raw

    write_fashion_files(tmp_path)
    cfg = {"dataset": "fashion_mnist", "data_dir": str(tmp_path), "download": False}
    assert load_raw(cfg, 0).train_labels.max() < 10
    write_idx(tmp_path / datasets.FASHION_MNIST_FILES["test_labels"][0], np.array([0, 3, 12, 1, 2]))
    with pytest.raises(DataError, match="test labels span 0..12 but the dataset has 10 classes"):
        load_raw(cfg, 0)
    with pytest.raises(DataError, match="data.data_dir is empty"):
        load_raw(dict(cfg, data_dir=""), 0)
