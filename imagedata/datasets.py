"""Readers for the raw dataset files, with checksummed downloads for users who are online.

Each loader returns uint8 image tensors [N, C, H, W] and int64 labels; nothing here depends on
torchvision (which has no CPU build on our target machines).
"""
from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import tarfile
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from core.io import atomic_path, sha256_file
from imagedata.imagefolder import ImageFolderError, is_image_folder, read_image_folder

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# Official files: the sha256 of the .gz as served (checked on download) and of its decompressed IDX
# content (checked on every read: repackaged copies such as Debian's recompress the same bytes).
FASHION_MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte.gz", "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                     "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train_labels": ("train-labels-idx1-ubyte.gz", "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                     "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "test_images": ("t10k-images-idx3-ubyte.gz", "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"


@dataclass(frozen=True)
class CifarArchive:
    """One official CIFAR python tarball: where its members are and what each must hash to."""
    tarball: str
    sha256: str  # of the tarball, checked on download
    folder: str  # inside the tarball
    label_key: bytes
    train_members: tuple[str, ...]
    test_member: str
    meta_member: str
    names_key: bytes
    member_md5: dict[str, str]  # the md5 the CIFAR page publishes per member, checked on every read
    num_classes: int


CIFAR_ARCHIVES = {
    "cifar10": CifarArchive(
        "cifar-10-python.tar.gz", "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        "cifar-10-batches-py", b"labels", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
        "batches.meta", b"label_names",
        {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
         "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
         "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e",
         "batches.meta": "5ff9c542aee3614f3951f8cda6e48888"}, 10),
    "cifar100": CifarArchive(
        "cifar-100-python.tar.gz", "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
        "cifar-100-python", b"fine_labels", ("train",), "test", "meta", b"fine_label_names",
        {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
         "meta": "7973b15100ade9c7d40fb424638fde48"}, 100),
}


class DataError(RuntimeError):
    """Dataset files are missing, corrupt or fail their checksum."""


@dataclass
class RawSplits:
    train_images: torch.Tensor  # uint8 [N, C, H, W]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]
    val_images: torch.Tensor | None = None  # a validation split of its own; None: split one off the training set
    val_labels: torch.Tensor | None = None

    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train_images.shape[1:])


def download(url: str, dest: Path, sha256: str) -> Path:
    """Fetch ``url`` to ``dest`` (atomically) and refuse it unless its sha256 matches."""
    print(f"downloading {url} -> {dest}")
    try:
        with atomic_path(dest) as tmp:
            urllib.request.urlretrieve(url, tmp)
            got = sha256_file(tmp)
            if got != sha256:
                raise DataError(f"{url}: sha256 {got} does not match the expected {sha256}; "
                                "the download is corrupt or the file changed upstream")
    except OSError as e:
        raise DataError(f"could not download {url} ({e}); put the file in {dest.parent} by hand") from e
    return dest


def _check_digest(path: Path | str, data: bytes, algorithm: str, expected: str) -> None:
    got = hashlib.new(algorithm, data).hexdigest()
    if got != expected:
        raise DataError(f"{path}: content {algorithm} {got} is not the official {expected}; the file is corrupt "
                        "or altered: delete it and fetch it again")


def read_idx(path: Path, content_sha256: str | None = None) -> np.ndarray:
    """Read an IDX file (gzipped or not): unsigned-byte tensors as in (Fashion-)MNIST.

    ``content_sha256``, when given, must match the decompressed bytes.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: unreadable IDX file ({e}); delete it and fetch it again") from e
    if content_sha256 is not None:
        _check_digest(path, data, "sha256", content_sha256)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: IDX header says {shape} but holds {body.size} bytes; the file is truncated")
    return body.reshape(shape)


def _find_fashion_mnist(data_dir: Path | None, allow_download: bool) -> dict[str, Path]:
    """The four IDX files: in ``data_dir`` when one is named (downloaded there if allowed; never another
    copy, so that config.yaml names the files that were read), else the system copy, else ./data."""
    candidates = [data_dir] if data_dir is not None else [FASHION_MNIST_SYSTEM_DIR, Path("data/fashion_mnist")]
    for folder in candidates:
        paths = {key: folder / name for key, (name, *_) in FASHION_MNIST_FILES.items()}
        if all(p.exists() for p in paths.values()):
            return paths
    target = candidates[-1]
    if not allow_download:
        hint = "leave data.data_dir unset to read the system copy" if data_dir else \
            "install them with 'apt-get install dataset-fashion-mnist'"
        raise DataError(f"Fashion-MNIST files not found in {' or '.join(map(str, candidates))}; {hint}, "
                        "or set data.download: true")
    paths = {}
    for key, (name, sha, _) in FASHION_MNIST_FILES.items():
        dest = target / name
        if not dest.exists():
            try:
                download(FASHION_MNIST_URL + name, dest, sha)
            except DataError as e:
                raise DataError(f"Fashion-MNIST not found locally and the download failed: {e}; install "
                                "'apt-get install dataset-fashion-mnist' or set data.data_dir") from e
        paths[key] = dest
    return paths


def load_fashion_mnist(data_dir: Path | None, allow_download: bool) -> RawSplits:
    paths = _find_fashion_mnist(data_dir, allow_download)
    arrays = {key: read_idx(p, FASHION_MNIST_FILES[key][2]) for key, p in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{paths[split + '_images']}: {split} images {images.shape} and labels "
                            f"{labels.shape} do not match")
    return RawSplits(torch.from_numpy(arrays["train_images"].copy()).unsqueeze(1),
                     torch.from_numpy(arrays["train_labels"].astype(np.int64)),
                     torch.from_numpy(arrays["test_images"].copy()).unsqueeze(1),
                     torch.from_numpy(arrays["test_labels"].astype(np.int64)),
                     list(FASHION_MNIST_CLASSES))


def load_image_folder(path: Path) -> RawSplits:
    """A folder or .zip of ``train/<class>/*``, ``test/<class>/*`` (and optionally ``val/<class>/*``)."""
    try:
        splits = read_image_folder(path)
    except ImageFolderError as e:
        raise DataError(str(e)) from e
    tensors = {split: (torch.from_numpy(splits.images[split]), torch.from_numpy(splits.labels[split]))
               for split in splits.images}
    val = tensors.get("val", (None, None))
    return RawSplits(*tensors["train"], *tensors["test"], splits.class_names, *val)


def load_cifar(name: str, data_dir: Path | None, allow_download: bool) -> RawSplits:
    """CIFAR-10/100 from the official python tarball (extracted folder or .tar.gz), or from an image-folder
    copy (a folder or .zip of class folders named as the official labels, which sort in label order).

    Every tarball member is md5-checked before it is unpickled, so only the official bytes reach pickle.
    """
    spec = CIFAR_ARCHIVES[name]
    if data_dir is not None and is_image_folder(data_dir):
        raw = load_image_folder(data_dir)
        if len(raw.class_names) != spec.num_classes or raw.image_shape() != (3, 32, 32):
            raise DataError(f"{data_dir}: {len(raw.class_names)} classes of {raw.image_shape()} images, but {name} "
                            f"has {spec.num_classes} classes of 3x32x32 images; use data.dataset: imagefolder "
                            "for other image folders")
        return raw
    root = data_dir or Path("data") / name
    archive = root / spec.tarball
    if not (root / spec.folder).is_dir() and not archive.exists():
        if not allow_download:
            raise DataError(f"{name}: neither {root / spec.folder} nor {archive} exists; download "
                            f"{CIFAR_URL + spec.tarball} there or set data.download: true")
        download(CIFAR_URL + spec.tarball, archive, spec.sha256)

    def unpickle(member: str) -> dict:
        path = root / spec.folder / member
        source = path if path.exists() else f"{archive} ({spec.folder}/{member})"
        try:
            if path.exists():
                blob = path.read_bytes()
            else:
                with tarfile.open(archive, "r:gz") as tar:
                    handle = tar.extractfile(f"{spec.folder}/{member}")
                    if handle is None:
                        raise KeyError(member)
                    blob = handle.read()
        except (OSError, KeyError, EOFError, zlib.error, tarfile.TarError) as e:
            raise DataError(f"{source}: cannot read '{member}' ({e}); the archive is incomplete or corrupt") from e
        _check_digest(source, blob, "md5", spec.member_md5[member])
        try:
            return pickle.loads(blob, encoding="bytes")
        except (EOFError, pickle.UnpicklingError) as e:
            raise DataError(f"{source}: cannot unpickle '{member}' ({e})") from e

    def split(members: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        batches = [unpickle(m) for m in members]
        images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([np.asarray(b[spec.label_key], dtype=np.int64) for b in batches])
        return torch.from_numpy(images), torch.from_numpy(labels)

    train_x, train_y = split(spec.train_members)
    test_x, test_y = split((spec.test_member,))
    names = [n.decode() for n in unpickle(spec.meta_member)[spec.names_key]]
    return RawSplits(train_x, train_y, test_x, test_y, names)


def synthetic_peak_bytes(train_size: int, test_size: int, image_size: int, channels: int, **_: object) -> int:
    """Memory that :func:`make_synthetic` holds at its peak: three float32 copies of the larger split."""
    return 12 * max(train_size, test_size) * channels * image_size ** 2


def make_synthetic(train_size: int, test_size: int, image_size: int, channels: int, num_classes: int,
                   seed: int) -> RawSplits:
    """Learnable toy images: each class is a fixed random blob pattern plus noise (tests, demos)."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(num_classes, channels, image_size // 4, image_size // 4, generator=g)
    templates = torch.nn.functional.interpolate(templates, size=(image_size, image_size), mode="bilinear")

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, num_classes, (n,), generator=g)
        noisy = templates[labels] + 0.25 * torch.randn(n, channels, image_size, image_size, generator=g)
        return (noisy.clamp(0, 1) * 255).round().to(torch.uint8), labels

    train_x, train_y = draw(train_size)
    test_x, test_y = draw(test_size)
    return RawSplits(train_x, train_y, test_x, test_y, [f"class_{i}" for i in range(num_classes)])


def _cifar_dataset(name: str, cfg: dict, data_dir: Path | None, seed: int) -> RawSplits:
    return load_cifar(name, data_dir, cfg["download"])


def _image_folder_dataset(cfg: dict, data_dir: Path | None, seed: int) -> RawSplits:
    if data_dir is None:
        raise DataError("data.dataset: imagefolder needs data.data_dir: a folder or .zip holding "
                        "train/<class>/ and test/<class>/")
    return load_image_folder(data_dir)


# data.dataset -> loader(data config, data_dir or None, seed); a new data set is one entry here
LOADERS: dict[str, Callable[[dict, Path | None, int], RawSplits]] = {
    "fashion_mnist": lambda cfg, data_dir, seed: load_fashion_mnist(data_dir, cfg["download"]),
    **{name: partial(_cifar_dataset, name) for name in CIFAR_ARCHIVES},
    "imagefolder": _image_folder_dataset,
    "synthetic": lambda cfg, data_dir, seed: make_synthetic(seed=seed, **cfg["synthetic"]),
}
DATASETS = tuple(LOADERS)  # the names data.dataset takes


def load_raw(data_cfg: dict, seed: int) -> RawSplits:
    if data_cfg["data_dir"] is not None and not str(data_cfg["data_dir"]).strip():
        raise DataError("data.data_dir is empty; name a folder, or leave it unset (null) for the dataset's "
                        "standard place")
    data_dir = Path(data_cfg["data_dir"]).expanduser() if data_cfg["data_dir"] else None
    name = data_cfg["dataset"]
    if name not in LOADERS:
        raise DataError(f"data.dataset: unknown dataset {name!r}; choose one of {', '.join(LOADERS)}")
    raw = LOADERS[name](data_cfg, data_dir, seed)
    _check_labels(raw, name)
    return raw


def _check_labels(raw: RawSplits, name: str) -> None:
    """Labels outside 0..classes-1 would only fail mid-training; refuse them when the data is read."""
    classes = len(raw.class_names)
    for split, labels in (("train", raw.train_labels), ("test", raw.test_labels), ("val", raw.val_labels)):
        if labels is not None and len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise DataError(f"{name} {split} labels span {int(labels.min())}..{int(labels.max())} but the dataset "
                            f"has {classes} classes; the files are corrupt or not {name}")
