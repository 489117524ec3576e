"""Raw readers on files the tests write: IDX (Fashion-MNIST format), CIFAR tarballs, checksummed downloads."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from imagedata import datasets
from imagedata.datasets import DataError, download, load_cifar, load_fashion_mnist, read_idx


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def write_fashion_files(folder: Path, monkeypatch, n_train: int = 12, n_test: int = 5) -> dict:
    """Small Fashion-MNIST-format files; the loader is told to expect their content checksums."""
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (n_train, 28, 28)), "train_labels": rng.integers(0, 10, n_train),
              "test_images": rng.integers(0, 256, (n_test, 28, 28)), "test_labels": rng.integers(0, 10, n_test)}
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for key, (name, gz_sha, _) in datasets.FASHION_MNIST_FILES.items():
        write_idx(folder / name, arrays[key])
        files[key] = (name, gz_sha, hashlib.sha256(gzip.decompress((folder / name).read_bytes())).hexdigest())
    monkeypatch.setattr(datasets, "FASHION_MNIST_FILES", files)
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


def test_fashion_mnist_from_data_dir(tmp_path: Path, monkeypatch):
    arrays = write_fashion_files(tmp_path, monkeypatch)
    raw = load_fashion_mnist(tmp_path, allow_download=False)
    assert raw.train_images.shape == (12, 1, 28, 28) and raw.test_images.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(raw.train_labels.numpy(), arrays["train_labels"])
    np.testing.assert_array_equal(raw.test_images[:, 0].numpy(), arrays["test_images"])
    assert raw.class_names[9] == "Ankle boot"


def test_fashion_mnist_missing_offline_says_how_to_get_it(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(None, allow_download=False)


def test_fashion_mnist_download_checks_sha256(tmp_path: Path, monkeypatch):
    """The real download path, served from file:// URLs of files the test writes."""
    source = tmp_path / "mirror"
    write_fashion_files(source, monkeypatch)
    sums = {k: (name, hashlib.sha256((source / name).read_bytes()).hexdigest(), content)
            for k, (name, _, content) in datasets.FASHION_MNIST_FILES.items()}
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(datasets, "FASHION_MNIST_URL", source.as_uri() + "/")
    monkeypatch.setattr(datasets, "FASHION_MNIST_FILES", sums)
    raw = load_fashion_mnist(tmp_path / "dl", allow_download=True)
    assert raw.train_images.shape[0] == 12 and (tmp_path / "dl" / sums["train_images"][0]).exists()

    corrupt = dict(sums, test_labels=(sums["test_labels"][0], "0" * 64, sums["test_labels"][2]))
    monkeypatch.setattr(datasets, "FASHION_MNIST_FILES", corrupt)
    with pytest.raises(DataError, match="sha256"):
        load_fashion_mnist(tmp_path / "dl2", allow_download=True)
    assert not (tmp_path / "dl2" / sums["test_labels"][0]).exists(), "a failed download leaves no file behind"


def test_download_unreachable_is_a_clear_error(tmp_path: Path):
    with pytest.raises(DataError, match="could not download"):
        download((tmp_path / "missing.bin").as_uri(), tmp_path / "out.bin", "0" * 64)


def write_cifar_tarball(root: Path, name: str, monkeypatch, n_per_batch: int = 4) -> tuple[Path, np.ndarray]:
    """A small tarball in the official layout; the loader is told to expect its members' md5."""
    spec = datasets.CIFAR_ARCHIVES[name]
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / spec.tarball
    first, md5 = None, {}
    with tarfile.open(archive, "w:gz") as tar:
        def add(member: str, obj: dict) -> None:
            blob = pickle.dumps(obj)
            md5[member] = hashlib.md5(blob).hexdigest()
            info = tarfile.TarInfo(f"{spec.folder}/{member}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        for member in [*spec.train_members, spec.test_member]:
            data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
            first = data if first is None else first
            add(member, {b"data": data, spec.label_key: rng.integers(0, 10, n_per_batch).tolist()})
        add(spec.meta_member, {spec.names_key: [f"c{i}".encode() for i in range(10)]})
    monkeypatch.setitem(datasets.CIFAR_ARCHIVES, name, dataclasses.replace(spec, member_md5=md5))
    return archive, first


@pytest.mark.parametrize("name,n_train", [("cifar10", 20), ("cifar100", 4)])
def test_cifar_from_tarball(tmp_path: Path, name: str, n_train: int, monkeypatch):
    _, first = write_cifar_tarball(tmp_path, name, monkeypatch)
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


def test_cifar_members_are_md5_checked_in_the_tarball_and_extracted(tmp_path: Path, monkeypatch):
    """A member that is not the official one is refused before it is unpickled, wherever it lies."""
    archive, _ = write_cifar_tarball(tmp_path / "tar", "cifar10", monkeypatch)
    spec = datasets.CIFAR_ARCHIVES["cifar10"]
    monkeypatch.setitem(datasets.CIFAR_ARCHIVES, "cifar10",
                        dataclasses.replace(spec, member_md5=dict(spec.member_md5, test_batch="0" * 32)))
    with pytest.raises(DataError, match=r"test_batch\): content md5 .* is not the official 0{32}"):
        load_cifar("cifar10", tmp_path / "tar", allow_download=False)

    monkeypatch.setitem(datasets.CIFAR_ARCHIVES, "cifar10", spec)
    extracted = tmp_path / "folder"
    with tarfile.open(archive) as tar:
        tar.extractall(extracted, filter="data")
    assert load_cifar("cifar10", extracted, allow_download=False).test_images.shape[0] == 4
    batch = extracted / spec.folder / "data_batch_2"
    blob = bytearray(batch.read_bytes())
    blob[-20] ^= 1  # one flipped bit in the pixel data still unpickles: only the checksum sees it
    batch.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"data_batch_2: content md5 .* delete it and fetch it again"):
        load_cifar("cifar10", extracted, allow_download=False)


def test_official_checksums_accept_the_system_fashion_mnist_and_refuse_an_altered_copy(tmp_path: Path):
    """The real files (Debian's recompressed .gz) pass the content checksums; one changed pixel does not."""
    system = datasets.FASHION_MNIST_SYSTEM_DIR
    if not (system / datasets.FASHION_MNIST_FILES["test_labels"][0]).exists():
        pytest.skip("dataset-fashion-mnist is not installed (setup.sh installs it)")
    name, _, content = datasets.FASHION_MNIST_FILES["test_images"]
    images = read_idx(system / name, content)
    assert images.shape == (10000, 28, 28)
    altered = images.copy()
    altered[0, 0, 0] ^= 1
    write_idx(tmp_path / name, altered)
    with pytest.raises(DataError, match=rf"{name}: content sha256 .* is not the official {content}"):
        read_idx(tmp_path / name, content)


def test_corrupt_deflate_stream_is_a_one_line_error(tmp_path: Path):
    write_idx(tmp_path / "c.gz", np.zeros((64, 64), dtype=np.uint8))
    data = bytearray((tmp_path / "c.gz").read_bytes())
    data[12:20] = b"\xff" * 8  # inside the deflate stream, past the gzip header
    (tmp_path / "c.gz").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"c.gz: unreadable IDX file"):
        read_idx(tmp_path / "c.gz")


def test_labels_out_of_range_and_empty_data_dir_are_refused_when_read(tmp_path: Path, monkeypatch):
    from imagedata.datasets import load_raw

    write_fashion_files(tmp_path, monkeypatch)
    cfg = {"dataset": "fashion_mnist", "data_dir": str(tmp_path), "download": False}
    assert load_raw(cfg, 0).train_labels.max() < 10
    labels = tmp_path / datasets.FASHION_MNIST_FILES["test_labels"][0]
    write_idx(labels, np.array([0, 3, 12, 1, 2]))
    files = dict(datasets.FASHION_MNIST_FILES)
    files["test_labels"] = (*files["test_labels"][:2], hashlib.sha256(gzip.decompress(labels.read_bytes())).hexdigest())
    monkeypatch.setattr(datasets, "FASHION_MNIST_FILES", files)
    with pytest.raises(DataError, match="test labels span 0..12 but the dataset has 10 classes"):
        load_raw(cfg, 0)
    with pytest.raises(DataError, match="data.data_dir is empty"):
        load_raw(dict(cfg, data_dir=""), 0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"files not found in {empty}; leave data.data_dir unset"):
        load_raw(dict(cfg, data_dir=str(empty)), 0)  # never the system copy: config.yaml names what was read
