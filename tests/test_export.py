"""Export bundle: the ONNX / TorchScript loaders reproduce the PyTorch model, and a changed bundle is refused."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bundle import export as export_module
from bundle.export import ExportFormat, export_bundle
from bundle.format import Bundle, BundleError, manifest_digest
from bundle.torch_runner import TorchBundle
from students.unified import UnifiedStudent
from tests.helpers import CLASSES, DEVICE_ENTRIES, IMAGE_SHAPE, PARTITIONS, WIDTHS, key_pair, tiny_student
from tests.helpers import images as _images

BYTES_PER_NUMBER = {"fp32": 4, "fp16": 2, "int8": 1}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: extra threads only add contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _load(path: Path, **kwargs) -> Bundle:
    return Bundle.load(path, threads=1, **kwargs)


@pytest.fixture(scope="module")
def model() -> UnifiedStudent:
    return tiny_student()


def _export(model: UnifiedStudent, out: Path, transport: str = "fp32", int8_weights: bool = False, **kwargs) -> dict:
    return export_bundle(model, out, image_shape=IMAGE_SHAPE, class_names=CLASSES, device_entries=DEVICE_ENTRIES,
                         calibration_images=_images(32, seed=1), form=ExportFormat(transport, int8_weights), **kwargs)


@pytest.fixture(scope="module")
def bundles(model: UnifiedStudent, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    out = {t: root / t for t in BYTES_PER_NUMBER}
    for transport, path in out.items():
        _export(model, path, transport=transport, int8_weights=transport == "fp32", extra={"run": transport})
    return out


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return _images(64, seed=2)


def _reference(model: UnifiedStudent, x: torch.Tensor, missing: list[int] | None = None) -> np.ndarray:
    with torch.no_grad():
        return model(x, missing=missing or []).numpy()


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


def test_fp32_bundle_reproduces_model(model, bundles, x):
    got = _load(bundles["fp32"]).predict(x.numpy())
    ref = _reference(model, x)
    assert _agreement(got, ref) == 1.0
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("transport, tolerance", [("fp16", 0.02), ("int8", 0.1)])
def test_compressed_transport_is_close(model, bundles, x, transport, tolerance):
    got = _load(bundles[transport]).predict(x.numpy())
    ref = _reference(model, x)
    assert _agreement(got, ref) >= 0.95
    assert np.abs(got - ref).max() < tolerance * np.abs(ref).max()


@pytest.mark.parametrize("transport", list(BYTES_PER_NUMBER))
def test_manifest_describes_transport(bundles, x, transport):
    manifest = json.loads((bundles[transport] / "manifest.json").read_text())
    bundle = _load(bundles[transport])
    vectors = bundle.device_vectors(x[:3].numpy())
    assert manifest["run"] == transport and manifest["num_classes"] == len(CLASSES)
    assert [d["teacher_filters"] for d in manifest["devices"]] == PARTITIONS
    for device, width, v in zip(manifest["devices"], WIDTHS, vectors):
        assert device["bytes_sent_per_inference"] == width * BYTES_PER_NUMBER[transport]
        assert v.shape == (3, width) and v.dtype == np.dtype(device["output_dtype"])
        assert device["params"] > 0 and device["macs"] > 0
    assert ("scales" in manifest["transport"]) == (transport == "int8")
    # the one description every topology shares: a gather device is one stage, and nothing is exchanged
    assert manifest["topology"] == "gather" and manifest["exchanges"] == []
    for device, width in zip(manifest["devices"], WIDTHS):
        [stage] = device["stages"]
        assert stage["files"] == device["files"] and stage["macs"] == device["macs"]
        assert stage["input_shape"] == list(IMAGE_SHAPE) and stage["output_shape"] == [width]


@pytest.mark.parametrize("transport, atol", [("fp32", 1e-4), ("int8", 0.1)])
def test_missing_device_matches_model(model, bundles, x, transport, atol):
    bundle = _load(bundles[transport])
    ref = _reference(model, x, missing=[1])
    got = bundle.predict(x.numpy(), missing=[1])
    np.testing.assert_allclose(got, ref, atol=atol, rtol=0)
    vectors = bundle.device_vectors(x.numpy())
    np.testing.assert_array_equal(bundle.aggregate([vectors[0], None]), got)


def test_torchscript_bundle_matches_model(model, bundles, x):
    bundle = TorchBundle.load(bundles["fp32"])
    for missing in ([], [0], [0, 1]):
        np.testing.assert_allclose(bundle.predict(x, missing=missing).numpy(), _reference(model, x, missing),
                                   atol=1e-5, rtol=0)


def test_predict_batches_equals_predict(bundles, x):
    bundle = _load(bundles["fp16"])
    np.testing.assert_array_equal(bundle.predict_batches(x.numpy(), batch_size=24), bundle.predict(x.numpy()))


def test_bad_inputs_are_refused(bundles, x):
    bundle = _load(bundles["int8"])
    with pytest.raises(ValueError, match=r"takes \[N, 1, 16, 16\]"):
        bundle.predict(x[:, :, :8].numpy())
    with pytest.raises(ValueError, match="out of range"):
        bundle.predict(x.numpy(), missing=[2])
    with pytest.raises(ValueError, match="device_0 vector is float32"):
        bundle.aggregate([np.zeros((2, 5), np.float32), None])


def test_uint8_images_are_scaled_and_bad_floats_refused(bundles, x):
    bundle = _load(bundles["fp32"])
    pixels = (x * 255).round()
    np.testing.assert_allclose(bundle.predict(pixels.numpy().astype(np.uint8)), bundle.predict((pixels / 255).numpy()),
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], these span \[0, 255\]"):
        bundle.predict(pixels.numpy())  # 0..255 floats: the silent wrong answer this check prevents
    for bad in (np.nan, np.inf):
        broken = x.numpy().copy()
        broken[0, 0, 0, 0] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            bundle.predict(broken)
    with pytest.raises(ValueError, match="images are int64"):
        bundle.predict(pixels.numpy().astype(np.int64))


@pytest.mark.parametrize("loader", [Bundle.load, TorchBundle.load])
def test_modified_bundle_is_refused(bundles, tmp_path, loader):
    copy = tmp_path / "bundle"
    shutil.copytree(bundles["fp32"], copy)
    with open(copy / "device_1" / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"^device_1/model\.onnx: sha256 mismatch .* re-export it$"):
        loader(copy)
    (copy / "aggregator" / "model.int8.onnx").unlink()
    shutil.copy(bundles["fp32"] / "device_1" / "model.onnx", copy / "device_1" / "model.onnx")
    with pytest.raises(BundleError, match=r"^aggregator/model\.int8\.onnx: missing"):
        loader(copy)


def test_export_recovers_from_a_kill_between_renames_and_clears_dead_build_folders(model, bundles, tmp_path):
    """A swap killed after moving the old bundle aside, and a build folder of a dead process: the next
    export puts the old bundle back before building, then leaves nothing behind."""
    out = tmp_path / "export"
    moved = tmp_path / ".export.abc.old"
    moved.mkdir()
    shutil.copytree(bundles["fp16"], moved / "previous")
    dead = tmp_path / ".export.dead.tmp"
    dead.mkdir()
    (dead / ".pid").write_text("999999999")  # no such process
    mine = tmp_path / ".export.live.tmp"
    mine.mkdir()
    (mine / ".pid").write_text(str(os.getpid()))  # a build in progress: left alone
    export_module._tidy(out)
    assert (out / "manifest.json").read_text() == (bundles["fp16"] / "manifest.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export.live.tmp", "export"]
    shutil.rmtree(mine)
    _export(model, out, transport="fp32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert not (out / ".pid").exists()


@pytest.mark.parametrize("int8_weights", [False, True])
def test_a_full_disk_is_one_line_naming_the_folder_and_leaves_nothing_behind(model, bundles, tmp_path, monkeypatch,
                                                                             int8_weights):
    """ENOSPC on the third model file (or inside the int8 quantiser): the earlier bundle is untouched and
    no build folder is left to keep the disk full."""
    out = tmp_path / "export"
    shutil.copytree(bundles["fp32"], out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    writes = []

    def fill_up(path: Path, data: bytes) -> None:
        writes.append(path)
        if len(writes) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        path.write_bytes(data)

    monkeypatch.setattr(export_module, "write_file", fill_up)
    if int8_weights:
        import onnxruntime.quantization as quantization

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))
        monkeypatch.setattr(quantization, "quantize_dynamic", full)
    with pytest.raises(RuntimeError, match=f"no space left on the disk holding {tmp_path} while writing the bundle"
                                           f"; the unfinished bundle was removed and {out} is as it was") as raised:
        _export(model, out, transport="fp16", int8_weights=int8_weights)
    assert "\n" not in str(raised.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("loader", [Bundle.load, TorchBundle.load])
def test_edited_manifest_field_is_refused(bundles, tmp_path, loader):
    copy = tmp_path / "bundle"
    shutil.copytree(bundles["fp32"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["class_names"][0] = "renamed"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="content does not match its manifest_sha256"):
        loader(copy)


def test_loader_does_not_import_torch():
    code = "import sys; import bundle.format; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_failed_export_keeps_earlier_bundle_and_success_replaces_it(model, bundles, x, tmp_path, monkeypatch):
    out = tmp_path / "export"
    shutil.copytree(bundles["fp16"], out)
    before = (out / "manifest.json").read_text()

    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter broke")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(RuntimeError, match="exporter broke"):
        _export(model, out, transport="fp32")
    monkeypatch.undo()
    assert (out / "manifest.json").read_text() == before
    _load(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary folders left behind

    model.train()  # export must use eval mode (BN running stats) and leave the caller's model as it was
    try:
        _export(model, out, transport="fp32")
        assert model.training
    finally:
        model.eval()
    bundle = _load(out)
    assert bundle.manifest["transport"]["name"] == "fp32"
    np.testing.assert_allclose(bundle.predict(x.numpy()), _reference(model, x), atol=1e-4, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_export_into_a_file_fails_cleanly(model, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError):
        _export(model, tmp_path / "file" / "export")
    assert (tmp_path / "file").read_text() == "not a folder"


@pytest.mark.parametrize("change, message", [
    ({"device_entries": [{}]}, "1 device entries"),
    ({"class_names": ["a"]}, "1 class names"),
    ({"calibration_images": torch.rand(4, 3, 16, 16)}, "calibration images have shape"),
    ({"form": ExportFormat(transport="int4")}, "unknown transport"),
    ({"extra": {"devices": []}}, "would overwrite"),
])
def test_export_checks_arguments_before_writing(model, tmp_path, change, message):
    kwargs = dict(image_shape=IMAGE_SHAPE, class_names=CLASSES, device_entries=DEVICE_ENTRIES,
                  calibration_images=_images(4, seed=1)) | change
    with pytest.raises(ValueError, match=message):
        export_bundle(model, tmp_path / "export", **kwargs)
    assert not any(tmp_path.iterdir())


def test_int8_weight_files_load_and_agree(model, bundles, x):
    manifest = json.loads((bundles["fp32"] / "manifest.json").read_text())
    for part in [*manifest["devices"], manifest["aggregator"]]:
        assert "onnx_int8" in part["files"], part.get("onnx_int8_error")
    bundle = _load(bundles["fp32"], use_int8=True)
    assert all(f.endswith("model.int8.onnx") for f in bundle.model_files)
    assert _agreement(bundle.predict(x.numpy()), _reference(model, x)) >= 0.9


def test_a_signed_bundle_loads_only_with_its_own_key_and_an_unsigned_one_is_refused(bundles, x, tmp_path):
    """The manifest digest proves integrity; the signature proves who exported it: an attacker who swaps a
    model and recomputes every checksum still fails the signature."""
    from bundle.signing import sign_bundle

    private, public = key_pair(tmp_path, "ours")
    _, other_public = key_pair(tmp_path, "theirs")
    signed = tmp_path / "signed"
    shutil.copytree(bundles["fp32"], signed)
    unsigned = tmp_path / "unsigned"
    shutil.copytree(bundles["fp32"], unsigned)
    sign_bundle(signed, private)
    np.testing.assert_array_equal(Bundle.load(signed, public_key=public).predict(x.numpy()),
                                  Bundle.load(unsigned).predict(x.numpy()))
    with pytest.raises(BundleError, match="unsigned bundle .* export it with --sign KEY"):
        Bundle.load(unsigned, public_key=public)
    with pytest.raises(BundleError, match="does not verify with .*theirs.pub.pem: signed by another key"):
        Bundle.load(signed, public_key=other_public)
    # a tampered model with a manifest whose checksums and digest were recomputed to match it
    manifest = json.loads((signed / "manifest.json").read_text())
    (signed / "aggregator" / "model.ts").write_bytes(b"another model")
    manifest["aggregator"]["sha256"]["aggregator/model.ts"] = export_module.sha256_file(signed / "aggregator/model.ts")
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (signed / "manifest.json").write_text(json.dumps(manifest))
    Bundle.load(signed)  # intact by its own checksums ...
    with pytest.raises(BundleError, match="does not verify"):
        Bundle.load(signed, public_key=public)  # ... but not exported by the key's holder


def test_bad_signing_keys_are_one_line_errors_naming_the_file(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from bundle.format import load_ed25519_key
    from bundle.signing import load_private_key

    with pytest.raises(BundleError, match="missing.pem: cannot read the private key"):
        load_private_key(tmp_path / "missing.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(BundleError, match="garbage.pem: not an unencrypted PEM public key"):
        load_ed25519_key(garbage)
    ecdsa = tmp_path / "ec.pem"
    ecdsa.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(BundleError, match="ec.pem: not an Ed25519 private key; bundles are signed with Ed25519"):
        load_private_key(ecdsa)
