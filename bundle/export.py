"""Per-device export bundle: one ONNX + TorchScript model per device and for the aggregator, plus a manifest.

Each device model ends in the transport encoding (fp32, fp16 cast, or uint8 quantisation with a
per-device scale), and the aggregator starts with the matching decoding, so what crosses the network
is exactly what the graphs produce and a device needs no code of ours. The bundle is built in a
temporary folder and moved onto ``out_dir`` only when complete, so a failed export never leaves a
half-written bundle or destroys the previous one. ``bundle.format`` loads the result.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import io
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from bundle.format import FORMAT, SCHEMA_VERSION, TRANSPORTS, manifest_digest
from bundle.memory import estimate_entry, staged_peak
from core.io import restore_interrupted_swap, sha256_file, swap_in, write_json_atomic
from students.complexity import count_macs, count_params, weight_bytes
from students.split import Combiner, CombineRule, GatherModel, average_channels

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8}
_VERIFY_TOLERANCE = {"float32": (1e-3, 1e-4), "float16": (2e-3, 2e-3), "uint8": (0.0, 1.0)}  # (rtol, atol)


class DeviceExport(nn.Module):
    """A device followed by its transport encoding; uint8 is round(v / scale) clipped to [0, 255]."""

    def __init__(self, device: nn.Module, dtype: str, scale: float | None) -> None:
        super().__init__()
        self.device = device
        self.dtype = dtype
        self.register_buffer("scale", torch.tensor(1.0 if scale is None else scale, dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        v = self.device(images)
        if self.dtype == "uint8":
            return torch.clamp(torch.round(v / self.scale), 0, 255).to(torch.uint8)
        return v.to(_TORCH_DTYPES[self.dtype])


class AggregatorExport(nn.Module):
    """Decodes the concatenated transported vectors to float32, then applies the aggregator's combining rule."""

    def __init__(self, aggregator: Combiner, dtype: str, scales: Sequence[float] | None) -> None:
        super().__init__()
        self.aggregator = aggregator
        self.dtype = dtype
        per_feature = torch.ones(sum(aggregator.widths)) if scales is None else torch.repeat_interleave(
            torch.tensor(scales, dtype=torch.float32), torch.tensor(aggregator.widths))
        self.register_buffer("scale", per_feature)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = features.to(torch.float32)
        return self.aggregator.combine(z * self.scale if self.dtype == "uint8" else z)


@dataclass(frozen=True)
class ExportFormat:
    """How a bundle is written (the config's ``export`` section): what devices send (``fp32``, ``fp16``,
    ``int8``), whether int8-weight models are added beside the fp32 ones, and the ONNX opset."""

    transport: str = "fp32"
    int8_weights: bool = False
    opset: int = 17


def export_bundle(model: GatherModel, out_dir: Path, *, image_shape: tuple[int, int, int],
                  class_names: list[str], calibration_images: torch.Tensor, form: ExportFormat = ExportFormat(),
                  device_entries: Sequence[dict] | None = None, extra: dict | None = None) -> dict:
    """Export ``model`` as a bundle in ``out_dir`` (replacing any earlier one only on success); returns the manifest.

    ``calibration_images`` (float32 in [0, 1], [N, *image_shape]) set the int8 scales and check that
    every exported graph reproduces the PyTorch model. ``device_entries`` adds the method's own
    entries to each device's (NoNN: the teacher filters it learned); ``extra`` top-level entries.
    """
    device_entries = list(device_entries or [{} for _ in model.devices])
    transport, int8_weights, opset = form.transport, form.int8_weights, form.opset
    _check_inputs(model, image_shape, class_names, device_entries, calibration_images, transport)
    dtype = TRANSPORTS[transport]
    model = copy.deepcopy(model).cpu().eval()  # the caller's model keeps its device and training mode
    images = calibration_images.detach().to("cpu", torch.float32)
    with _building(Path(out_dir)) as tmp:
        scales = _int8_scales(model, images) if dtype == "uint8" else None
        encoders = [DeviceExport(d, dtype, None if scales is None else scales[i]).eval()
                    for i, d in enumerate(model.devices)]
        devices = [_export_device(e, f"device_{i}", tmp, device_entries[i], image_shape, images, opset,
                                  int8_weights) for i, e in enumerate(encoders)]
        with torch.no_grad():
            features = torch.cat([e(images) for e in encoders], dim=1)
        aggregator = _export_aggregator(model.aggregator, tmp, dtype, scales, features, opset, int8_weights)
        manifest = {
            "schema_version": SCHEMA_VERSION, "format": FORMAT, "topology": "gather",
            "class_names": list(class_names), "num_classes": len(class_names),
            "input": _input_spec(image_shape),
            "transport": _transport_spec(transport, dtype, scales),
            "exchanges": [], "devices": devices, "aggregator": aggregator,
        }
        clash = sorted(set(extra or {}) & set(manifest))
        if clash:
            raise ValueError(f"extra manifest entries {clash} would overwrite the bundle's own; rename them")
        manifest.update(extra or {})
        manifest["manifest_sha256"] = manifest_digest(manifest)
        write_json_atomic(tmp / "manifest.json", manifest)
    return manifest


def export_chain(segments: Sequence[nn.Module], out_dir: Path, *, image_shape: tuple[int, int, int],
                 class_names: list[str], calibration_images: torch.Tensor, opset: int = 17,
                 device_entries: Sequence[dict] | None = None, extra: dict | None = None) -> dict:
    """Export a layer-wise split (model parallelism) as a chain bundle: device i takes device i-1's feature
    map (device 0 the images) and the last device returns the logits; fp32 throughout, no aggregator model.
    """
    _check_calibration(calibration_images, image_shape)
    device_entries = list(device_entries or [{} for _ in segments])
    segments = [copy.deepcopy(m).cpu().eval() for m in segments]
    x = calibration_images.detach().to("cpu", torch.float32)
    with _building(Path(out_dir)) as tmp:
        devices = []
        for i, segment in enumerate(segments):
            last = i == len(segments) - 1
            names = ("images" if i == 0 else "features_in", "logits" if last else "features")
            files = _export_part(segment, tmp, f"device_{i}", x, names, opset, False)
            with torch.no_grad():
                y = segment(x)
            out_shape = list(y.shape[1:])
            macs = count_macs(segment, tuple(x.shape[1:]))
            devices.append({"name": f"device_{i}", **files, **device_entries[i],
                            "stages": [_one_stage(files, list(x.shape[1:]), out_shape, macs)],
                            "layers": getattr(segment, "layer_span", None),
                            "input": {"shape": list(x.shape[1:]), "dtype": "float32"},
                            "output_shape": out_shape, "output_width": int(np.prod(out_shape)),
                            "output_dtype": "float32", "params": count_params(segment),
                            "weight_bytes": weight_bytes(segment), "macs": macs,
                            "bytes_sent_per_inference": int(np.prod(out_shape)) * 4})
            x = y
        if devices[-1]["output_shape"] != [len(class_names)]:
            raise ValueError(f"the last segment returns {devices[-1]['output_shape']}, expected "
                             f"[{len(class_names)}] logits")
        manifest = {"schema_version": SCHEMA_VERSION, "format": FORMAT, "topology": "chain",
                    "class_names": list(class_names), "num_classes": len(class_names),
                    "input": _input_spec(image_shape), "transport": _transport_spec("fp32", "float32", None),
                    "exchanges": [], "devices": devices, "aggregator": {"kind": "chain", "files": {}, "sha256": {}}}
        manifest.update(extra or {})
        manifest["manifest_sha256"] = manifest_digest(manifest)
        write_json_atomic(tmp / "manifest.json", manifest)
    return manifest


def export_staged(stages: Sequence[Sequence[nn.Module]], exchanges: Sequence[dict], aggregator: Combiner,
                  out_dir: Path, *, image_shape: tuple[int, int, int], class_names: list[str],
                  calibration_images: torch.Tensor, form: ExportFormat = ExportFormat(),
                  device_entries: Sequence[dict] | None = None, extra: dict | None = None) -> dict:
    """Export devices that run in stages and exchange channels between them (SepNN) as a staged bundle.

    ``stages[i]``: device i's modules in order (the first takes the image, the last returns its vector);
    ``exchanges``: ``{"after_stage", "route", "channels"}``, after which device j averages in the first
    ``channels`` channels of device ``route[j]``'s map, sent in the transport dtype. Each stage is its
    own ONNX model (checked against PyTorch on the calibration flow, exchanges included); the last ends
    in the transport encoding and the aggregator starts with its decoding, as in ``export_bundle``.
    """
    dtype = form.transport
    if dtype not in ("fp32", "fp16"):
        raise ValueError(f"a staged bundle sends maps mid-network in fp32 or fp16, not {dtype!r}")
    dtype = TRANSPORTS[dtype]
    if len({len(s) for s in stages}) != 1 or len(stages) != len(aggregator.widths):
        raise ValueError(f"{len(stages)} devices with {[len(s) for s in stages]} stages for an aggregator of "
                         f"{len(aggregator.widths)}: every device needs the same number of stages")
    _check_calibration(calibration_images, image_shape)
    device_entries = list(device_entries or [{} for _ in stages])
    by_stage = {int(e["after_stage"]): e for e in exchanges}
    devices = [[copy.deepcopy(m).cpu().eval() for m in s] for s in stages]
    devices = [[*s[:-1], DeviceExport(s[-1], dtype, None).eval()] for s in devices]
    aggregator = copy.deepcopy(aggregator).cpu().eval()
    maps = [calibration_images.detach().to("cpu", torch.float32)] * len(devices)
    with _building(Path(out_dir)) as tmp:
        entries: list[list[dict]] = [[] for _ in devices]
        for s in range(len(devices[0])):
            last = s == len(devices[0]) - 1
            names = ("images" if s == 0 else "map_in", "features" if last else "map")
            outputs = []
            for i, device in enumerate(devices):
                (tmp / f"device_{i}").mkdir(exist_ok=True)
                files = _export_part(device[s], tmp, f"device_{i}/stage_{s}", maps[i], names, form.opset,
                                     form.int8_weights)
                with torch.no_grad():
                    y = device[s](maps[i])
                entries[i].append({**files, "input_shape": list(maps[i].shape[1:]), "output_shape": list(y.shape[1:]),
                                   "macs": count_macs(device[s], tuple(maps[i].shape[1:]))})
                outputs.append(y)
            exchange = by_stage.get(s)
            if exchange is not None:
                sent = [y[:, :exchange["channels"]].to(_TORCH_DTYPES[dtype]) for y in outputs]
                outputs = [average_channels(y, sent[exchange["route"][j]]) for j, y in enumerate(outputs)]
            maps = outputs
        features = torch.cat(maps, dim=1)
        aggregator_entry = _export_aggregator(aggregator, tmp, dtype, None, features, form.opset, form.int8_weights)
        itemsize = np.dtype(dtype).itemsize
        message_bytes = [int(np.prod(entries[0][e["after_stage"]]["output_shape"][1:])) * e["channels"] * itemsize
                         for e in exchanges]
        manifest = {
            "schema_version": SCHEMA_VERSION, "format": FORMAT, "topology": "stages",
            "class_names": list(class_names), "num_classes": len(class_names),
            "input": _input_spec(image_shape), "transport": _transport_spec(form.transport, dtype, None),
            "exchanges": [{"after_stage": int(e["after_stage"]), "route": [int(r) for r in e["route"]],
                           "channels": int(e["channels"]), "bytes": b} for e, b in zip(exchanges, message_bytes)],
            "devices": [_staged_device(i, modules, parts, device_entries[i], image_shape, dtype, sum(message_bytes))
                        for i, (modules, parts) in enumerate(zip(stages, entries))],
            "aggregator": aggregator_entry,
        }
        manifest.update(extra or {})
        manifest["manifest_sha256"] = manifest_digest(manifest)
        write_json_atomic(tmp / "manifest.json", manifest)
    return manifest


def _staged_device(index: int, modules: Sequence[nn.Module], stages: list[dict],
                   entries: dict, image_shape: tuple[int, int, int], dtype: str, exchange_bytes: int) -> dict:
    """A staged device's manifest entry: its stages, and every file of them listed for checking."""
    width = int(stages[-1]["output_shape"][0])
    memory = {}  # every stage loaded, one stage's activations at a time; None when a stage's estimate failed
    for key in ("peak_memory", "peak_memory_int8"):
        found = [s.get(key) for s in stages]
        if any(key in s for s in stages):
            memory[key] = None if None in found else staged_peak(found)
    return {"name": f"device_{index}", "input": _input_spec(image_shape), **entries, "stages": stages,
            "files": {f"stage_{s}_{k}": f for s, st in enumerate(stages) for k, f in st["files"].items()},
            "sha256": {f: h for st in stages for f, h in st["sha256"].items()},
            **memory,
            "output_width": width, "output_dtype": dtype,
            "params": sum(count_params(m) for m in modules), "weight_bytes": sum(weight_bytes(m) for m in modules),
            "macs": sum(s["macs"] for s in stages),
            "bytes_sent_per_inference": width * np.dtype(dtype).itemsize + exchange_bytes}


def _check_inputs(model: GatherModel, image_shape: tuple[int, int, int], class_names: list[str],
                  device_entries: list[dict], calibration_images: torch.Tensor, transport: str) -> None:
    """Fail before writing anything, with one line that says what does not fit."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; choose one of: {', '.join(TRANSPORTS)}")
    if len(device_entries) != len(model.devices):
        raise ValueError(f"{len(device_entries)} device entries for a model of {len(model.devices)} devices")
    if len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {model.num_classes} classes")
    _check_calibration(calibration_images, image_shape)


def _check_calibration(calibration_images: torch.Tensor, image_shape: tuple[int, int, int]) -> None:
    if calibration_images.ndim != 4 or tuple(calibration_images.shape[1:]) != tuple(image_shape):
        raise ValueError(f"calibration images have shape {list(calibration_images.shape)}, "
                         f"expected [N, {', '.join(map(str, image_shape))}]")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tidy(out_dir: Path) -> None:
    """Undo what a killed export left beside ``out_dir``: put back a bundle moved aside by a swap that
    never finished, and delete build folders whose process is gone."""
    restore_interrupted_swap(out_dir)
    for tmp in out_dir.parent.glob(f".{out_dir.name}.*.tmp"):
        owner = tmp / ".pid"
        pid = int(owner.read_text()) if owner.is_file() and owner.read_text().strip().isdigit() else None
        if pid is None or not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _building(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh folder beside ``out_dir``; on success swap it in (old bundle moved away, then deleted)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _tidy(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        (tmp / ".pid").write_text(str(os.getpid()))
        yield tmp
        (tmp / ".pid").unlink()
        swap_in(tmp, out_dir)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise RuntimeError(f"no space left on the disk holding {out_dir.parent} while writing the bundle; the "
                           f"unfinished bundle was removed and {out_dir} is as it was: free some space and rerun") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def _int8_scales(model: GatherModel, images: torch.Tensor) -> list[float]:
    """Per device: largest calibration activation / 255 (zero point 0: the vectors must be >= 0, as NoNN's
    ReLU means are; export refuses others). The device's slice of the fill vector counts too, so the
    vector that stands in for a failed device is not clipped.
    """
    fill = model.aggregator.fill_vector()
    spans = [torch.cat([d(images).flatten(), fill[span]]) for d, span in zip(model.devices, model.aggregator.slices())]
    lowest = min(float(v.min()) for v in spans)
    if lowest < 0:
        raise ValueError(f"int8 transport needs vectors >= 0, these reach {lowest:.3g}; use fp32 or fp16")
    peaks = [float(v.max()) for v in spans]
    return [p / 255 if p > 0 else 1.0 / 255 for p in peaks]


def _export_device(wrapper: DeviceExport, name: str, root: Path, entries: dict,
                   image_shape: tuple[int, int, int], images: torch.Tensor, opset: int, int8_weights: bool) -> dict:
    device = wrapper.device
    files = _export_part(wrapper, root, name, images, ("images", "features"), opset, int8_weights)
    macs = count_macs(device, image_shape)
    return {"name": name, **files, "input": _input_spec(image_shape), **entries,
            "stages": [_one_stage(files, list(image_shape), [device.out_width], macs)],
            "output_width": device.out_width, "output_dtype": wrapper.dtype,
            "params": count_params(device), "weight_bytes": weight_bytes(device), "macs": macs,
            "bytes_sent_per_inference": device.out_width * np.dtype(wrapper.dtype).itemsize}


def _one_stage(part: dict, input_shape: list[int], output_shape: list[int], macs: int) -> dict:
    """The ``stages`` list entry of a device that runs one model (side by side or in a chain): its files,
    the shapes it maps between and its MACs, as each stage of a staged device is described."""
    return {"files": part["files"], "input_shape": input_shape, "output_shape": output_shape, "macs": macs}


def _export_aggregator(aggregator: Combiner, root: Path, dtype: str, scales: list[float] | None,
                       features: torch.Tensor, opset: int, int8_weights: bool) -> dict:
    """``features``: the devices' transported calibration vectors, concatenated (the aggregator's real input)."""
    wrapper = AggregatorExport(aggregator, dtype, scales).eval()
    files = _export_part(wrapper, root, "aggregator", features, ("features", "logits"), opset, int8_weights)
    width = sum(aggregator.widths)
    return {**files, "kind": aggregator.kind, "input_width": width, "input_dtype": dtype,
            "widths": list(aggregator.widths), "fill": aggregator.fill_vector().tolist(),
            "params": count_params(aggregator), "weight_bytes": weight_bytes(aggregator),
            "macs": count_macs(CombineRule(aggregator), (width,))}


def _export_part(wrapper: nn.Module, root: Path, name: str, example: torch.Tensor, io_names: tuple[str, str],
                 opset: int, int8_weights: bool) -> dict:
    """Write ``name/model.onnx`` (checked against PyTorch on all of ``example``), ``model.ts`` and optionally
    ``model.int8.onnx``, with each ONNX model's peak inference memory (``bundle.memory``). Tracing needs only two rows (the batch axis stays dynamic), which keeps export fast.
    """
    (root / name).mkdir()
    files = {"onnx": f"{name}/model.onnx", "torchscript": f"{name}/model.ts"}
    with torch.no_grad():
        expected = wrapper(example).numpy()
    export_onnx(wrapper, example[:2], root / files["onnx"], io_names, opset)
    _verify_onnx(root / files["onnx"], example.numpy(), expected, io_names[0])
    _export_torchscript(wrapper, example[:2], root / files["torchscript"])
    extra: dict[str, Any] = estimate_entry(root / files["onnx"], "peak_memory")
    if int8_weights:
        error = _quantize_weights(root / files["onnx"], root / f"{name}/model.int8.onnx", example.numpy(), io_names[0])
        if error is None:
            files["onnx_int8"] = f"{name}/model.int8.onnx"
            extra |= estimate_entry(root / files["onnx_int8"], "peak_memory_int8")
        else:
            extra["onnx_int8_error"] = error
    return {"files": files, "sha256": {rel: sha256_file(root / rel) for rel in files.values()}, **extra}


def export_onnx(wrapper: nn.Module, example: torch.Tensor, path: Path, io_names: tuple[str, str], opset: int) -> None:
    """Legacy (TorchScript-based) ONNX export with a dynamic batch axis on the one input and output."""
    with warnings.catch_warnings():
        # The legacy exporter is deprecated, and tracing fixes the resize branch to the exported image size.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        buffer = io.BytesIO()  # serialised in memory, written from Python: a full disk is an OSError, not an abort
        torch.onnx.export(wrapper, (example,), buffer, input_names=[io_names[0]], output_names=[io_names[1]],
                          dynamic_axes={io_names[0]: {0: "batch"}, io_names[1]: {0: "batch"}},
                          opset_version=opset, dynamo=False)
    write_file(path, buffer.getvalue())


def _export_torchscript(wrapper: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.trace(wrapper, (example,)), buffer)
    write_file(path, buffer.getvalue())


def write_file(path: Path, data: bytes) -> None:
    """Every model file of a bundle is written here."""
    path.write_bytes(data)


def _run_onnx(path: Path, inputs: np.ndarray, input_name: str) -> np.ndarray:
    """One check run; a single thread, since thread start-up and spinning would cost more than the run itself."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return session.run(None, {input_name: inputs})[0]


def _verify_onnx(path: Path, inputs: np.ndarray, expected: np.ndarray, input_name: str) -> None:
    """Refuse an ONNX graph that does not reproduce the PyTorch module (uint8 may differ by one step)."""
    got = _run_onnx(path, inputs, input_name)
    rtol, atol = _VERIFY_TOLERANCE[str(expected.dtype)]
    if got.dtype != expected.dtype or not np.allclose(got.astype(np.float64), expected.astype(np.float64),
                                                      rtol=rtol, atol=atol):
        diff = np.abs(got.astype(np.float64) - expected.astype(np.float64)).max()
        raise RuntimeError(f"{path.parent.name}/{path.name}: ONNX Runtime output ({got.dtype}) differs from "
                           f"PyTorch ({expected.dtype}) by up to {diff:.3g}; the export is wrong, not written")


def _quantize_weights(src: Path, dst: Path, example: np.ndarray, input_name: str) -> str | None:
    """Dynamic int8 weight quantisation; returns why it failed (model not written) instead of raising."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        _run_onnx(dst, example, input_name)
    except Exception as e:  # noqa: BLE001 - any failure only means "no int8 file", recorded in the manifest
        dst.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise  # a full disk fails the export (one line, nothing left behind), never just the int8 copy
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def _input_spec(image_shape: tuple[int, int, int]) -> dict:
    return {"shape": list(image_shape), "dtype": "float32", "range": [0.0, 1.0], "layout": "NCHW"}


def _transport_spec(transport: str, dtype: str, scales: list[float] | None) -> dict:
    spec: dict[str, Any] = {"name": transport, "dtype": dtype}
    if scales is not None:
        spec.update(scales=scales, zero_point=0)
    return spec
