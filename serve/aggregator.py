"""``nonn serve aggregator``: collects the K device vectors of each request and publishes the logits.

In a chain bundle (model parallelism) it waits for the last device's logits alone and forwards them;
when they miss the deadline it answers zero logits (no information: MP has no fallback).

A request opens when its image is seen on ``input`` (or its first device vector, whichever comes
first). It is answered as soon as all K vectors are in, or when ``deadline_ms`` has passed since it
opened; each missing device is filled with its training-mean vector exactly as evaluation does
(``students.bundle.fill_vectors``), and the answer's flags name the devices that were filled.
Messages for a request already answered are counted as late and dropped.
"""
from __future__ import annotations

import collections
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serve.device import INPUT_DTYPES, images_from
from serve.endpoint import Endpoint
from serve.mqtt import Broker, Link, topic
from serve.wire import (KIND_DEVICE, KIND_INPUT, KIND_OUTPUT, Message, WireError, bundle_key, decode, encode,
                        peek_device)
from students.bundle import aggregator_input, fill_vectors, is_chain, read_manifest

ANSWERED_MEMORY = 100_000  # request ids remembered after answering, to recognise late vectors


@dataclass
class Pending:
    opened: float
    rows: int
    vectors: list = field(default_factory=list)


class Aggregator(Endpoint):
    def __init__(self, bundle_dir: str | Path, broker: Broker, credentials: tuple[str, str],
                 deadline_ms: float = 50.0, link: Link | None = None, threads: int = 1) -> None:
        import onnxruntime as ort

        if deadline_ms <= 0:
            raise ValueError(f"--deadline-ms {deadline_ms}: must be > 0")
        root, manifest = read_manifest(bundle_dir, part=-1)  # the aggregator's files only
        self.chain = is_chain(manifest)
        self.num_devices = len(manifest["devices"])
        self.num_classes = manifest["num_classes"]
        if self.chain:
            self.session, self.fills = None, None
            self.expected = [self.num_devices - 1]
        else:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            self.session = ort.InferenceSession(str(root / manifest["aggregator"]["files"]["onnx"]),
                                                sess_options=options, providers=["CPUExecutionProvider"])
            self.fills = fill_vectors(manifest)
            self.expected = list(range(self.num_devices))
        self.dtype = np.dtype(manifest["transport"]["dtype"])
        self.widths = [d["output_width"] for d in manifest["devices"]]
        self.input_shape = tuple(manifest["input"]["shape"])
        self.key = bundle_key(manifest["manifest_sha256"][:12])
        self.deadline_s = deadline_ms / 1000.0
        self.pending: dict[int, Pending] = {}
        self.answered: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.inbox: queue.Queue = queue.Queue()
        self.filled = collections.Counter()  # device index -> requests answered without it
        super().__init__("aggregator", manifest["manifest_sha256"][:12], broker, credentials, link)
        self.out_topic = topic(self.bundle_id, "out")
        self.on(topic(self.bundle_id, "input"), lambda data: self.inbox.put((time.monotonic(), KIND_INPUT, data)))
        for device in self.expected if self.chain else ["+"]:
            self.on(topic(self.bundle_id, "dev", device),
                    lambda data: self.inbox.put((time.monotonic(), KIND_DEVICE, data)))

    def serve(self) -> None:
        """Answer until SIGTERM/SIGINT; the network loop runs in paho's thread, decisions in this one."""
        self.handle_signals()
        self.client.loop_start()
        self.announce()
        while not self.stop.is_set():
            try:
                arrived, kind, data = self.inbox.get(timeout=self._wait_s())
            except queue.Empty:
                pass
            else:
                try:
                    self._take(arrived, kind, data)
                except WireError as e:
                    self.dropped[str(e)] += 1
            self._answer_expired()
        self.close()
        self.client.loop_stop()

    def _wait_s(self) -> float:
        if not self.pending:
            return 0.05
        first = min(p.opened for p in self.pending.values())
        return max(0.0, min(0.05, first + self.deadline_s - time.monotonic()))

    def _take(self, arrived: float, kind: int, data: bytes) -> None:
        if kind == KIND_INPUT:
            message = decode(data, self.key, KIND_INPUT, self.input_shape, INPUT_DTYPES)
            images_from(message.payload)  # an image every device refuses opens no request
            self._open(message.request, message.payload.shape[0], arrived)
            return
        message = self._decode_device(data)
        pending = self._open(message.request, message.payload.shape[0], arrived)
        if pending is None:
            return
        if pending.rows != message.payload.shape[0]:
            raise WireError("malformed")
        if pending.vectors[message.device] is not None:
            raise WireError("duplicate")
        pending.vectors[message.device] = message.payload
        if all(pending.vectors[i] is not None for i in self.expected):
            self._answer(message.request)

    def _decode_device(self, data: bytes) -> Message:
        device = peek_device(data)
        if device not in self.expected:
            raise WireError("malformed")
        return decode(data, self.key, KIND_DEVICE, (self.widths[device],), (self.dtype,))

    def _open(self, request: int, rows: int, arrived: float) -> Pending | None:
        if request in self.answered:
            self.dropped["late"] += 1
            return None
        if request not in self.pending:
            self.pending[request] = Pending(arrived, rows, [None] * self.num_devices)
        return self.pending[request]

    def _answer_expired(self) -> None:
        now = time.monotonic()
        for request in [r for r, p in self.pending.items() if now - p.opened >= self.deadline_s]:
            self._answer(request)

    def _answer(self, request: int) -> None:
        pending = self.pending.pop(request)
        missing = [i for i in self.expected if pending.vectors[i] is None]
        start = time.perf_counter()
        logits = self._combine(pending)
        self.compute_s += time.perf_counter() - start
        self.computed += 1
        self.filled.update(missing)
        flags = sum(1 << i for i in missing)
        self.publish(self.out_topic, encode(KIND_OUTPUT, self.key, request, logits, flags=flags), logits.nbytes)
        self.answered[request] = None
        while len(self.answered) > ANSWERED_MEMORY:
            self.answered.popitem(last=False)

    def _combine(self, pending: Pending) -> np.ndarray:
        if self.chain:
            last = pending.vectors[self.expected[0]]
            return last if last is not None else np.zeros((pending.rows, self.num_classes), np.float32)
        return self.session.run(None, {"features": aggregator_input(self.fills, pending.vectors, pending.rows)})[0]

    def stats(self) -> dict:
        return {**super().stats(), "filled": {str(k): v for k, v in sorted(self.filled.items())},
                "deadline_ms": self.deadline_s * 1000.0}
