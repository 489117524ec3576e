"""Image-folder data sets: ``train/<class>/*``, ``test/<class>/*`` and an optional ``val/<class>/*``,
in a folder or a .zip, decoded once with Pillow and cached as arrays.

Class names are the folder names, sorted, so label ``i`` is the ``i``-th name. The layout may sit one
folder down (``cifar10/train/...``, as archives are often made). Decoding tens of thousands of small
images takes tens of seconds; the arrays are cached beside the source (or, where that is read-only, in
``~/.cache/nonn/imagefolder``) under the source's sha256, so a changed source is decoded again.
"""
from __future__ import annotations

import hashlib
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from core.io import atomic_path, sha256_file

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPLITS = ("train", "val", "test")  # val is optional
CACHE_VERSION = 1  # bump when the cached arrays' layout changes
USER_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nonn" / "imagefolder"


class ImageFolderError(RuntimeError):
    """The folder or archive does not hold a usable image-folder data set."""


@dataclass
class ImageFolderSplits:
    images: dict[str, np.ndarray]  # split -> uint8 [N, C, H, W]
    labels: dict[str, np.ndarray]  # split -> int64 [N]
    class_names: list[str]


class _Source:
    """Uniform listing and reading over a folder or a zip archive, paths as 'train/cat/1.jpg'."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.zip = zipfile.ZipFile(path) if path.is_file() else None
        if self.zip is not None:
            names = self.zip.namelist()
        else:
            names = [p.relative_to(path).as_posix() + "/" * p.is_dir() for p in path.rglob("*")]
        names = [n for n in names if not any(part.startswith((".", "__MACOSX")) for part in n.split("/"))]
        self.files = [n for n in names if not n.endswith("/")]
        self.folders = [n.rstrip("/") for n in names if n.endswith("/")]  # empty ones too

    def read(self, name: str) -> bytes:
        return self.zip.read(name) if self.zip is not None else (self.path / name).read_bytes()

    def digest(self) -> str:
        """sha256 of a zip file, or of a folder's image paths and contents (in sorted order)."""
        if self.zip is not None:
            return sha256_file(self.path)
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + hashlib.sha256(self.read(name)).digest())
        return h.hexdigest()


def _layout(source: _Source) -> dict[str, dict[str, list[str]]]:
    """split -> class -> sorted image paths, with the layout's root found at the top or one folder down."""
    roots = {""} | {f.split("/")[0] + "/" for f in source.files if "/" in f}
    found = [r for r in sorted(roots) if any(f.startswith(r + "train/") for f in source.files)
             and any(f.startswith(r + "test/") for f in source.files)]
    if not found:
        raise ImageFolderError(f"{source.path}: no train/ and test/ folders (at the top or one folder down); an "
                               "image-folder data set holds train/<class>/*.jpg and test/<class>/*.jpg")
    root = found[0]
    splits: dict[str, dict[str, list[str]]] = {}
    for folder in source.folders:
        parts = PurePosixPath(folder[len(root):]).parts if folder.startswith(root) else ()
        if len(parts) == 2 and parts[0] in SPLITS:
            splits.setdefault(parts[0], {}).setdefault(parts[1], [])
    for name in source.files:
        if not name.startswith(root):
            continue
        parts = PurePosixPath(name[len(root):]).parts
        if len(parts) < 2 or parts[0] not in SPLITS:
            continue
        classes = splits.setdefault(parts[0], {})
        if len(parts) == 2:  # a file directly in train/: no class folder to give it a label
            raise ImageFolderError(f"{source.path}: {name} is not in a class folder; put it in "
                                   f"{root}{parts[0]}/<class>/")
        images = classes.setdefault(parts[1], [])
        if len(parts) == 3 and parts[2].lower().endswith(IMAGE_SUFFIXES):
            images.append(name)
    for split, classes in splits.items():
        for cls, images in classes.items():
            if not images:
                raise ImageFolderError(f"{source.path}: class folder {root}{split}/{cls}/ holds no images "
                                       f"({', '.join(IMAGE_SUFFIXES)}); add images or remove the folder")
            images.sort()
    reference = sorted(splits["train"])
    for split, classes in splits.items():
        for missing, present in ((set(reference) - set(classes), "train"), (set(classes) - set(reference), split)):
            if missing:
                other = split if present == "train" else "train"
                raise ImageFolderError(f"{source.path}: class folder '{sorted(missing)[0]}' is in {root}{present}/ "
                                       f"but not in {root}{other}/; every split needs the same class folders")
    return splits


def _decode(source: _Source, name: str) -> np.ndarray:
    """One image as uint8 [C, H, W]: greyscale stays one channel, everything else becomes RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(source.read(name))) as img:
            img = img.convert("L" if img.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB")
            array = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, zipfile.BadZipFile) as e:
        raise ImageFolderError(f"{source.path}: cannot read image {name} ({e}); replace or delete it") from e
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _decode_all(source: _Source, layout: dict[str, dict[str, list[str]]]) -> ImageFolderSplits:
    from tqdm import tqdm

    class_names = sorted(layout["train"])
    total = sum(len(v) for classes in layout.values() for v in classes.values())
    images: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    first: tuple[str, tuple[int, ...]] | None = None
    with tqdm(total=total, desc=f"decoding {source.path.name}", unit="img", leave=False,
              disable=total < 2000) as bar:
        for split in (s for s in SPLITS if s in layout):
            arrays, split_labels = [], []
            for label, cls in enumerate(class_names):
                for name in layout[split][cls]:
                    array = _decode(source, name)
                    if first is None:
                        first = (name, array.shape)
                    elif array.shape != first[1]:
                        what = "channels" if array.shape[0] != first[1][0] else "size"
                        raise ImageFolderError(
                            f"{source.path}: {name} has {what} {_shape(array.shape)} but {first[0]} has "
                            f"{_shape(first[1])}; every image must have one size and channel count (resize or "
                            "convert them first)")
                    arrays.append(array)
                    split_labels.append(label)
                    bar.update()
            images[split] = np.stack(arrays)
            labels[split] = np.asarray(split_labels, dtype=np.int64)
    return ImageFolderSplits(images, labels, class_names)


def _shape(shape: tuple[int, ...]) -> str:
    return f"{shape[2]}x{shape[1]} with {shape[0]} channel{'s' * (shape[0] != 1)}"


def cache_path(source: Path, digest: str) -> Path:
    """Beside the source when its folder is writable, else in the user's cache folder.

    A folder whose mode grants nobody write access counts as read-only even for root (who could write it).
    """
    name = f".{source.name}.{digest[:16]}.v{CACHE_VERSION}.npz"
    parent = source.resolve().parent
    writable = os.access(parent, os.W_OK) and parent.stat().st_mode & 0o222
    return parent / name if writable else USER_CACHE / name


def _load_cache(path: Path, digest: str) -> ImageFolderSplits | None:
    """The cached arrays, or None when there are none or they are unreadable or not this source's."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["source_sha256"]) != digest:
                return None
            splits = [s for s in SPLITS if f"{s}_images" in z]
            return ImageFolderSplits({s: z[f"{s}_images"] for s in splits}, {s: z[f"{s}_labels"] for s in splits},
                                     [str(n) for n in z["class_names"]])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        print(f"{path}: unreadable image cache ({e}); decoding the images again")
        return None


def read_image_folder(path: Path) -> ImageFolderSplits:
    """Read (or load from the cache) an image-folder data set from a folder or a .zip of one."""
    if not path.exists():
        raise ImageFolderError(f"{path}: not found; data.data_dir must name a folder or .zip holding "
                               "train/<class>/ and test/<class>/")
    try:
        source = _Source(path)
    except zipfile.BadZipFile as e:
        raise ImageFolderError(f"{path}: not a readable zip archive ({e}); name a folder or a .zip") from e
    digest = source.digest()
    cache = cache_path(path, digest)
    cached = _load_cache(cache, digest)
    if cached is not None:
        return cached
    splits = _decode_all(source, _layout(source))
    arrays = {f"{s}_{kind}": a for s in splits.images
              for kind, a in (("images", splits.images[s]), ("labels", splits.labels[s]))}
    try:
        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, source_sha256=np.asarray(digest), class_names=np.asarray(splits.class_names), **arrays)
    except OSError as e:  # a cache we cannot write costs time on the next run, nothing else
        print(f"could not cache the decoded images at {cache} ({e}); they will be decoded again next time")
    return splits


def is_image_folder(path: Path) -> bool:
    """Whether ``path`` looks like an image-folder data set (a .zip, or a folder with train/ and test/)."""
    if path.is_file():
        return path.suffix.lower() == ".zip"
    return path.is_dir() and any((d / "train").is_dir() and (d / "test").is_dir()
                                 for d in (path, *(c for c in path.iterdir() if c.is_dir())))
