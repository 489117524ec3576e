"""``nonn serve device``: one process per device, running only its own model from the bundle.

It loads its manifest entry and model (sha256-checked), takes images from ``input`` (in a chain
bundle, device i > 0 takes device i-1's feature map from ``dev/<i-1>`` instead) and publishes its
output on ``dev/<i>`` in the bundle's transport dtype. Needs numpy, onnxruntime and paho-mqtt only.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bundle.format import is_chain, model_images, read_manifest
from serve.endpoint import Endpoint
from serve.mqtt import Broker, Link, topic
from serve.wire import KIND_DEVICE, KIND_INPUT, WireError, bundle_key, decode, encode

INPUT_DTYPES = (np.dtype("uint8"), np.dtype("float32"))


def images_from(payload: np.ndarray) -> np.ndarray:
    """float32 images in [0, 1] exactly as ``Bundle.predict`` makes them (``bundle.format.model_images``)."""
    try:
        return model_images(payload, payload.shape[1:])
    except ValueError as e:
        raise WireError("bad_input") from e


class Device(Endpoint):
    def __init__(self, bundle_dir: str | Path, index: int, broker: Broker, credentials: tuple[str, str],
                 link: Link | None = None, threads: int = 1, public_key: Path | None = None) -> None:
        import onnxruntime as ort

        if index < 0:
            raise ValueError(f"--index {index}: device indices start at 0")
        root, manifest = read_manifest(bundle_dir, part=index, public_key=public_key)
        if index >= len(manifest["devices"]):
            raise ValueError(f"--index {index}: the bundle has devices 0..{len(manifest['devices']) - 1}")
        entry = manifest["devices"][index]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(root / entry["files"]["onnx"]), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.index = index
        self.input_name = self.session.get_inputs()[0].name
        self.key = bundle_key(manifest["manifest_sha256"][:12])
        self.input_shape = tuple(manifest["input"]["shape"])
        self.upstream = manifest["devices"][index - 1] if is_chain(manifest) and index > 0 else None
        scales = manifest["transport"].get("scales")
        self.scale = float(scales[index]) if scales else 0.0
        super().__init__(entry["name"], manifest["manifest_sha256"][:12], broker, credentials, link)
        self.out_topic = topic(self.bundle_id, "dev", index)
        if self.upstream is None:
            self.on(topic(self.bundle_id, "input"), self._infer)
        else:
            self.on(topic(self.bundle_id, "dev", index - 1), self._infer)

    def _read(self, data: bytes):
        if self.upstream is None:
            message = decode(data, self.key, KIND_INPUT, self.input_shape, INPUT_DTYPES)
            return message, images_from(message.payload)
        message = decode(data, self.key, KIND_DEVICE, tuple(self.upstream["output_shape"]), (np.dtype("float32"),))
        if message.device != self.index - 1:
            raise WireError("malformed")
        return message, message.payload

    def _infer(self, data: bytes) -> None:
        message, inputs = self._read(data)
        start = time.perf_counter()
        vector = self.session.run(None, {self.input_name: inputs})[0]
        self.compute_s += time.perf_counter() - start
        self.computed += 1
        out = encode(KIND_DEVICE, self.key, message.request, vector, device=self.index, scale=self.scale)
        self.publish(self.out_topic, out, vector.nbytes)

    def serve(self) -> None:
        """Answer until SIGTERM/SIGINT; the network loop (and inference) runs in paho's thread, which
        reconnects when the broker goes away."""
        self.handle_signals()
        self.client.loop_start()
        self.announce()
        while not self.stop.wait(0.1):
            pass
        self.close()
        self.client.loop_stop()
