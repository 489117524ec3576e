"""Run an exported NoNN bundle with ONNX Runtime alone: no torch, no project code.

This file depends only on the standard library, numpy and (lazily) onnxruntime, so it can be copied
onto a device by itself. Every file is checked against the manifest's sha256 before anything is
loaded: a bundle that was modified after export is refused rather than silently giving other answers.
"""
from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# 2: manifest_sha256 over its own content; 3: aggregator kind and fill (any method); 4: every bundle has a
# topology (gather | chain | stages), exchanges, and each device its stages (one, unless staged)
SCHEMA_VERSION = 4
FORMAT = "nonn-bundle"
TRANSPORTS = {"fp32": "float32", "fp16": "float16", "int8": "uint8"}  # transport name -> dtype on the wire
SIGNATURE_FILE = "manifest.sig"  # Ed25519 signature of manifest.json's bytes (nonn export --sign KEY)


class BundleError(ValueError):
    """The bundle is missing, malformed or was changed after export."""


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's content (canonical JSON, without the digest itself): no field, such as
    the fill vector or class_names, can be edited unnoticed."""
    content = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(path: str | Path, part: int | None = None, public_key: str | Path | None = None) -> tuple[Path, dict]:
    """Bundle folder and its manifest, after checking the schema, the manifest's own digest and the sha256
    of every listed file; with ``part`` (an index into ``parts``: devices, then the aggregator, which is
    also -1) only that part's files, so a runtime process checks nothing but the model it loads. With
    ``public_key`` (a PEM file) the manifest must also carry that key's signature (``bundle.signing``)."""
    root = Path(path)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: no manifest.json; is this an export folder?")
    if public_key is not None:
        verify_signature(root, public_key)
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{manifest_path}: unreadable manifest ({e}); re-export the bundle") from e
    if manifest.get("format") != FORMAT or manifest.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(f"{manifest_path}: format {manifest.get('format')!r} schema "
                          f"{manifest.get('schema_version')!r}, this loader reads {FORMAT!r} schema {SCHEMA_VERSION}; "
                          "re-export the bundle (nonn export --force)")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise BundleError(f"{manifest_path}: content does not match its manifest_sha256 (edited after export?); "
                          "re-export the bundle")
    try:
        every = parts(manifest)
        if part is not None and not -len(every) <= part < len(every):
            raise BundleError(f"{manifest_path}: no part {part}; the bundle has {len(every) - 1} devices "
                              "and an aggregator")
        for entry in every if part is None else [every[part]]:
            _verify_part(root, entry)
    except KeyError as e:
        raise BundleError(f"{manifest_path}: manifest lacks the entry {e}; re-export the bundle") from e
    return root, manifest


def load_ed25519_key(path: str | Path, private: bool = False):
    """The Ed25519 key (public, or the private one) in an unencrypted PEM file; errors name the file.
    ``cryptography`` is imported only here: a device that checks no signature does not need it."""
    kind = "private" if private else "public"
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as e:
        raise BundleError("signed bundles need the 'cryptography' package: pip install cryptography") from e
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BundleError(f"{path}: cannot read the {kind} key ({e.strerror})") from e
    try:
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as e:
        raise BundleError(f"{path}: not an unencrypted PEM {kind} key ({str(e).splitlines()[0]})") from e
    if not isinstance(key, ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey):
        raise BundleError(f"{path}: not an Ed25519 {kind} key; bundles are signed with Ed25519 (openssl genpkey "
                          "-algorithm ed25519 -out key.pem; openssl pkey -in key.pem -pubout -out key.pub.pem)")
    return key


def verify_signature(root: Path, public_key: str | Path) -> None:
    """Raise BundleError unless ``manifest.json`` carries a valid ``manifest.sig`` by the key's holder. The
    checksums prove a bundle intact; this proves who exported it (``bundle.signing`` signs)."""
    key = load_ed25519_key(public_key)
    from cryptography.exceptions import InvalidSignature

    signature = root / SIGNATURE_FILE
    if not signature.is_file():
        raise BundleError(f"{root}: unsigned bundle (no {SIGNATURE_FILE}) and a public key was given; export it "
                          "with --sign KEY")
    try:
        key.verify(signature.read_bytes(), (root / "manifest.json").read_bytes())
    except InvalidSignature as e:
        raise BundleError(f"{root}: {SIGNATURE_FILE} does not verify with {public_key}: signed by another key, "
                          "or the manifest changed after signing") from e


def parts(manifest: dict) -> list[dict]:
    """The devices in manifest order, then the aggregator."""
    return [*manifest["devices"], manifest["aggregator"]]


def _verify_part(root: Path, part: dict) -> None:
    unlisted = set(part["files"].values()) - set(part["sha256"])
    if unlisted:
        raise BundleError(f"{sorted(unlisted)[0]}: no sha256 in the manifest; re-export the bundle")
    for rel, expected in part["sha256"].items():
        file = root / rel
        if not file.is_file():
            raise BundleError(f"{rel}: missing (the manifest lists it); the bundle is incomplete — re-export it")
        actual = _sha256(file)
        if actual != expected:
            raise BundleError(f"{rel}: sha256 mismatch (manifest says {expected}, file is {actual}); "
                              "the bundle was modified — re-export it")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fill_vectors(manifest: dict) -> list[np.ndarray]:
    """Per device, what stands in for a failed device: its slice of the aggregator's fill vector (NoNN:
    the training mean), encoded for transport.

    Encoded exactly as the device graph encodes: a cast, or round(v / scale) clipped to [0, 255].
    """
    transport = manifest["transport"]
    mean = np.asarray(manifest["aggregator"]["fill"], dtype=np.float32)
    bounds = np.cumsum([0] + [d["output_width"] for d in manifest["devices"]])
    fills = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        v = mean[a:b]
        if transport["dtype"] == "uint8":
            v = np.clip(np.round(v / np.float32(transport["scales"][i])), 0, 255)
        fills.append(v.astype(transport["dtype"]))
    return fills


def is_chain(manifest: dict) -> bool:
    """A chain bundle (model parallelism): device i feeds device i+1 and the last returns the logits.
    Otherwise (``gather``, ``stages``) the devices run side by side on the image and the aggregator
    combines their vectors."""
    return manifest["topology"] == "chain"


def exchanges(manifest: dict) -> dict[int, dict]:
    """A staged bundle's mid-network messages (SepNN), by the stage they follow: after stage ``s`` device
    j averages into its map the first ``channels`` channels that device ``route[j]`` sends. A gather or
    chain bundle has one stage per device and none."""
    return {int(e["after_stage"]): e for e in manifest["exchanges"]}


def reads(manifest: dict, device: int) -> list[tuple]:
    """The topics (under the bundle's root) device ``device`` reads, first its input: the one description
    of who talks to whom that the runtime and the broker's ACL both follow. Side by side: the images; in a
    chain: the previous device's map; staged: the images, then each exchange's peer message."""
    first = ("dev", device - 1) if is_chain(manifest) and device > 0 else ("input",)
    return [first, *(("dev", e["route"][device], f"x{s}") for s, e in sorted(exchanges(manifest).items()))]


def writes(manifest: dict, device: int) -> list[tuple]:
    """The topics device ``device`` publishes: its output (vector, map or logits) and its exchange messages."""
    return [("dev", device), *(("dev", device, f"x{s}") for s in sorted(exchanges(manifest)))]


def exchange_message(fmap: np.ndarray, exchange: dict, dtype: np.dtype) -> np.ndarray:
    """What a device sends at an exchange: the first ``channels`` channels of its map, in the transport dtype."""
    return np.ascontiguousarray(fmap[:, :exchange["channels"]], dtype=dtype)


def average_channels(own: np.ndarray, received: np.ndarray | None) -> np.ndarray:
    """``own`` with its first channels averaged with a peer's message; unchanged when none arrived (a peer
    down or late). The numpy twin of ``students.split.average_channels``, which training uses."""
    if received is None:
        return own
    m = received.shape[1]
    out = own.copy()
    out[:, :m] = (own[:, :m] + received.astype(np.float32)) / np.float32(2)
    return out


def run_model(session: Any, x: np.ndarray) -> np.ndarray:
    """One ONNX Runtime model on its one input."""
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def onnx_file(files: dict, use_int8: bool = False) -> str:
    """A model's ONNX file: the int8-weight one where export wrote one and ``use_int8`` asks for it."""
    return files["onnx_int8"] if use_int8 and "onnx_int8" in files else files["onnx"]


def model_files(device: dict, use_int8: bool = False) -> list[str]:
    """The ONNX files a device runs, one per stage in order (a gather or chain device has one)."""
    return [onnx_file(stage["files"], use_int8) for stage in device["stages"]]


def check_missing(missing: Sequence[int], num_devices: int) -> list[int]:
    bad = [i for i in missing if not 0 <= i < num_devices]
    if bad:
        raise ValueError(f"missing devices {bad} out of range: the bundle has devices 0..{num_devices - 1}")
    return sorted(set(missing))


def model_images(images: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Float images in [0, 1] as they are, uint8 images (0..255) scaled by 1/255; anything else refused.

    The one conversion every caller shares (``Bundle.predict``, the runtime's devices), so a device
    over the wire computes exactly what the bundle computes in process.
    """
    raw = np.asarray(images)
    if raw.ndim != 4 or list(raw.shape[1:]) != list(shape):
        raise ValueError(f"images have shape {list(raw.shape)}, the bundle takes "
                         f"[N, {', '.join(map(str, shape))}] float32 in [0, 1] (or uint8 in 0..255)")
    if raw.dtype == np.uint8:
        return np.ascontiguousarray(raw, dtype=np.float32) / np.float32(255.0)
    if not np.issubdtype(raw.dtype, np.floating):
        raise ValueError(f"images are {raw.dtype}; the bundle takes float images in [0, 1] or uint8 in 0..255")
    images = np.ascontiguousarray(raw, dtype=np.float32)
    if not np.isfinite(images).all():
        raise ValueError("images contain NaN or inf; the bundle takes finite float images in [0, 1]")
    if images.size and (images.min() < 0.0 or images.max() > 1.0):
        raise ValueError(f"float images must lie in [0, 1], these span [{images.min():.3g}, {images.max():.3g}]; "
                         "divide 0..255 pixels by 255, or pass them as uint8")
    return images


def aggregator_input(fills: Sequence[np.ndarray], vectors: Sequence[np.ndarray | None], rows: int) -> np.ndarray:
    """The aggregator's ``features``: the devices' vectors side by side, a missing one (None) replaced by
    its fill vector, exactly as evaluation and the runtime's aggregator both do."""
    columns = [np.broadcast_to(fill, (rows, fill.size)) if v is None else v for fill, v in zip(fills, vectors)]
    return np.ascontiguousarray(np.concatenate(columns, 1))


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 5) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


class Bundle:
    """ONNX Runtime sessions for each device's stages (one, unless the bundle is staged) and one for the
    aggregator; ``predict`` runs them all, exchanging mid-network messages as the devices do."""

    def __init__(self, root: Path, manifest: dict, device_stages: list[list[Any]], aggregator_session: Any,
                 model_files: list[str]) -> None:
        self.root = root
        self.manifest = manifest
        self.device_stages = device_stages
        self.aggregator_session = aggregator_session
        self.model_files = model_files  # what each session loaded: the devices' stages in order, then the aggregator
        self.chain = is_chain(manifest)
        self.exchanges = exchanges(manifest)
        self.fills = None if self.chain else fill_vectors(manifest)
        self.transport_dtype = np.dtype(manifest["transport"]["dtype"])

    @classmethod
    def load(cls, path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None,
             use_int8: bool = False, public_key: str | Path | None = None) -> Bundle:
        """Verify and load a bundle. ``use_int8`` takes each model's int8-weight file where export wrote one;
        ``public_key``: refuse it unless its manifest is signed by that key."""
        import onnxruntime as ort

        root, manifest = read_manifest(path, public_key=public_key)
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads

        def session(file: str) -> Any:
            return ort.InferenceSession(str(root / file), sess_options=options,
                                        providers=list(providers or ["CPUExecutionProvider"]))

        per_device = [model_files(d, use_int8) for d in manifest["devices"]]
        aggregator = [onnx_file(manifest["aggregator"]["files"], use_int8)] if manifest["aggregator"]["files"] else []
        return cls(root, manifest, [[session(f) for f in files] for files in per_device],
                   session(aggregator[0]) if aggregator else None, [f for fs in per_device for f in fs] + aggregator)

    @property
    def num_devices(self) -> int:
        return len(self.device_stages)

    @property
    def staged(self) -> bool:
        """Devices that exchange messages mid-network: a failed device also takes its messages away."""
        return bool(self.exchanges)

    def device_vectors(self, images: np.ndarray) -> list[np.ndarray]:
        """Each device's transported vector for ``images`` (float32 in [0, 1], [N, C, H, W]), every device up."""
        if self.chain:
            raise ValueError("a chain bundle's devices feed each other; use predict")
        return self._run_devices(self._check_images(images), [])

    def aggregate(self, vectors: Sequence[np.ndarray | None], batch_size: int | None = None) -> np.ndarray:
        """Logits from the devices' vectors; None marks a failed device, replaced by its training mean.

        ``batch_size`` is needed only when every device failed.
        """
        if len(vectors) != self.num_devices:
            raise ValueError(f"{len(vectors)} vectors for a bundle of {self.num_devices} devices")
        n = next((len(v) for v in vectors if v is not None), batch_size)
        if n is None:
            raise ValueError("every device is missing: pass batch_size to get the fallback logits")
        checked = [None if v is None else self._check_vector(i, v) for i, v in enumerate(vectors)]
        return self.aggregator_session.run(None, {"features": aggregator_input(self.fills, checked, n)})[0]

    def predict(self, images: np.ndarray, missing: Sequence[int] = ()) -> np.ndarray:
        """Logits as the deployed system computes them; devices in ``missing`` are not run (simulated failure):
        their vectors are filled in, and in a staged bundle their peers get no message from them."""
        images = self._check_images(images)
        skip = check_missing(missing, self.num_devices)
        if self.chain:
            if skip:
                raise ValueError(f"devices {skip} missing: a chain bundle (model parallelism) needs every device")
            x = images
            for [session] in self.device_stages:
                x = run_model(session, x)
            return x
        return self.aggregate(self._run_devices(images, skip), batch_size=len(images))

    def predict_batches(self, images: np.ndarray, batch_size: int = 256, missing: Sequence[int] = ()) -> np.ndarray:
        """``predict`` over a large array in chunks, to bound memory."""
        chunks = [self.predict(images[i:i + batch_size], missing) for i in range(0, len(images), batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.manifest["num_classes"]), np.float32)

    def device_latency_ms(self, image: np.ndarray, repeats: int = 30) -> list[float]:
        """Median time of each device's models on one image (batch 1), in ms on this machine, its stages
        summed (with its own map between them); in a chain each device gets its predecessor's output."""
        x = self._check_images(image[None])
        times = []
        for stages in self.device_stages:
            total, y = 0.0, x
            for session in stages:
                total += median_ms(lambda s=session, v=y: run_model(s, v), repeats)
                y = run_model(session, y)
            times.append(total)
            if self.chain:
                x = y
        return times

    def _run_devices(self, images: np.ndarray, skip: Sequence[int]) -> list[np.ndarray | None]:
        """Every device's vector (None for those in ``skip``), stage by stage: after stage s each device
        averages in its peer's message where the bundle exchanges (``average_channels``), as the runtime does."""
        maps: list[np.ndarray | None] = [None if i in skip else images for i in range(self.num_devices)]
        for s in range(len(self.device_stages[0])):
            maps = [None if m is None else run_model(self.device_stages[i][s], m) for i, m in enumerate(maps)]
            exchange = self.exchanges.get(s)
            if exchange is not None:
                sent = [None if m is None else exchange_message(m, exchange, self.transport_dtype) for m in maps]
                maps = [None if m is None else average_channels(m, sent[exchange["route"][j]])
                        for j, m in enumerate(maps)]
        return maps

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        return model_images(images, self.manifest["input"]["shape"])

    def _check_vector(self, i: int, v: np.ndarray) -> np.ndarray:
        width = self.fills[i].size
        if v.dtype != self.transport_dtype or v.ndim != 2 or v.shape[1] != width:
            raise ValueError(f"device_{i} vector is {v.dtype} {list(v.shape)}, "
                             f"expected {self.transport_dtype} [N, {width}]")
        return v
