"""``nonn serve aggregator``: collects the K device vectors of each request and publishes the logits.

In a chain bundle (model parallelism) it waits for the last device's logits alone and forwards them;
when they miss the deadline it answers zero logits (no information: MP has no fallback).

A request opens only when its image is seen on ``input`` (the source's topic). It is answered as soon
as all K vectors are in, or when ``deadline_ms`` has passed since it opened; each missing device is
filled with its training-mean vector exactly as evaluation does (``bundle.format.fill_vectors``), and
the answer's flags name the devices that were filled. Messages for a request already answered are
counted as late and dropped.

Who sent a vector is the topic it came on (``dev/<i>``, which the broker's ACL lets only device i's
credential publish), never the header: a header that names another device is dropped as spoofed. A
vector that arrives before its request's image is held (at most ``EARLY_PER_DEVICE`` per device, for one
deadline) and dropped as unsolicited if no image claims it. Each sender may have at most
``QUEUED_PER_SENDER`` messages waiting: a flood costs the flooding credential its own messages, not the
other requests their answers.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bundle.format import aggregator_input, fill_vectors, is_chain, read_manifest
from serve import defaults
from serve.device import INPUT_DTYPES, images_from
from serve.endpoint import Endpoint
from serve.mqtt import Broker, Link, topic
from serve.wire import KIND_DEVICE, KIND_INPUT, KIND_OUTPUT, Message, WireError, bundle_key, decode, encode, peek_device

ANSWERED_MEMORY = 100_000  # request ids remembered after answering, to recognise late vectors
EARLY_PER_DEVICE = 64      # vectors held per device for requests whose image has not been seen yet
QUEUED_PER_SENDER = 1024   # messages waiting per sender (the source, or one device) before its next are dropped


@dataclass
class Pending:
    opened: float
    rows: int
    vectors: list = field(default_factory=list)


class Aggregator(Endpoint):
    def __init__(self, bundle_dir: str | Path, broker: Broker, credentials: tuple[str, str],
                 deadline_ms: float = defaults.DEADLINE_MS, link: Link | None = None, threads: int = 1,
                 public_key: Path | None = None) -> None:
        import onnxruntime as ort

        if deadline_ms <= 0:
            raise ValueError(f"--deadline-ms {deadline_ms}: must be > 0")
        root, manifest = read_manifest(bundle_dir, part=-1, public_key=public_key)  # the aggregator's files only
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
        self.queued: collections.Counter = collections.Counter()  # sender -> messages waiting in the inbox
        self.queue_lock = threading.Lock()
        self.early: dict[int, collections.OrderedDict[int, tuple[float, Message]]] = {
            d: collections.OrderedDict() for d in self.expected}
        self.filled = collections.Counter()  # device index -> requests answered without it
        super().__init__("aggregator", manifest["manifest_sha256"][:12], broker, credentials, link)
        self.out_topic = topic(self.bundle_id, "out")
        self.on(topic(self.bundle_id, "input"), lambda data: self._enqueue(KIND_INPUT, data, None))
        for device in self.expected:
            self.on(topic(self.bundle_id, "dev", device),
                    lambda data, sender=device: self._enqueue(KIND_DEVICE, data, sender))

    def _enqueue(self, kind: int, data: bytes, sender: int | None) -> None:
        """From paho's thread: queue a message unless its sender already has its share waiting."""
        with self.queue_lock:
            if self.queued[sender] >= QUEUED_PER_SENDER:
                raise WireError("flood")
            self.queued[sender] += 1
        self.inbox.put((time.monotonic(), kind, data, sender))

    def serve(self) -> None:
        """Answer until SIGTERM/SIGINT; the network loop runs in paho's thread, decisions in this one."""
        self.handle_signals()
        self.client.loop_start()
        self.announce()
        while not self.stop.is_set():
            try:
                arrived, kind, data, sender = self.inbox.get(timeout=self._wait_s())
            except queue.Empty:
                pass
            else:
                with self.queue_lock:
                    self.queued[sender] -= 1
                try:
                    self._take(arrived, kind, data, sender)
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

    def _take(self, arrived: float, kind: int, data: bytes, sender: int | None) -> None:
        if kind == KIND_INPUT:
            message = decode(data, self.key, KIND_INPUT, self.input_shape, INPUT_DTYPES)
            images_from(message.payload)  # an image every device refuses opens no request
            pending = self._open(message.request, message.payload.shape[0], arrived)
            for device, held in self.early.items():
                early = held.pop(message.request, None)
                if pending is not None and early is not None:
                    try:
                        self._add(pending, message.request, device, early[1])
                    except WireError as e:
                        self.dropped[str(e)] += 1
            return
        message = self._decode_device(data, sender)
        if message.request in self.answered:
            self.dropped["late"] += 1
            return
        pending = self.pending.get(message.request)
        if pending is None:
            self._hold(sender, arrived, message)
            return
        self._add(pending, message.request, sender, message)

    def _add(self, pending: Pending, request: int, device: int, message: Message) -> None:
        if pending.rows != message.payload.shape[0]:
            raise WireError("malformed")
        if pending.vectors[device] is not None:
            raise WireError("duplicate")
        pending.vectors[device] = message.payload
        if all(pending.vectors[i] is not None for i in self.expected):
            self._answer(request)

    def _hold(self, device: int, arrived: float, message: Message) -> None:
        """A vector whose image has not been seen: keep it for one deadline, a bounded number per device."""
        held = self.early[device]
        if message.request in held:
            raise WireError("duplicate")
        held[message.request] = (arrived, message)
        while len(held) > EARLY_PER_DEVICE:
            held.popitem(last=False)
            self.dropped["unsolicited"] += 1

    def _decode_device(self, data: bytes, sender: int) -> Message:
        if peek_device(data) != sender:  # the header names a device other than the topic's credential
            raise WireError("spoofed")
        return decode(data, self.key, KIND_DEVICE, (self.widths[sender],), (self.dtype,))

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
        for held in self.early.values():
            while held and now - next(iter(held.values()))[0] >= self.deadline_s:
                held.popitem(last=False)
                self.dropped["unsolicited"] += 1

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
