"""``nonn serve device``: one process per device, running only its own model from the bundle.

It loads its manifest entry and models (sha256-checked), takes images from ``input`` (in a chain
bundle, device i > 0 takes device i-1's feature map from ``dev/<i-1>`` instead) and publishes its
output on ``dev/<i>`` in the bundle's transport dtype; in a staged bundle it also exchanges channels
with its peers between its stages (``bundle.format.reads`` / ``writes`` name every topic). Needs
numpy, onnxruntime and paho-mqtt only.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bundle.format import (
    average_channels,
    exchange_message,
    exchanges,
    is_chain,
    model_files,
    model_images,
    read_manifest,
    reads,
    run_model,
    writes,
)
from serve import defaults
from serve.endpoint import Endpoint
from serve.mqtt import Broker, Link, topic
from serve.wire import KIND_DEVICE, KIND_INPUT, WireError, bundle_key, decode, encode, peek_device

INPUT_DTYPES = (np.dtype("uint8"), np.dtype("float32"))
EARLY_MESSAGES = 64       # peer messages held for requests this device has not reached yet
FINISHED_MEMORY = 10_000  # requests remembered after answering, to recognise late peer messages


def images_from(payload: np.ndarray) -> np.ndarray:
    """float32 images in [0, 1] exactly as ``Bundle.predict`` makes them (``bundle.format.model_images``)."""
    try:
        return model_images(payload, payload.shape[1:])
    except ValueError as e:
        raise WireError("bad_input") from e


@dataclass
class Parked:
    """A request waiting at an exchange for its peer's message: the stage it ran, its map, since when."""

    stage: int
    fmap: np.ndarray
    since: float


class Device(Endpoint):
    """Runs its stages on each request. Between stages where the bundle exchanges (SepNN), it publishes its
    channels on ``dev/<i>/x<s>`` and waits for its peer's (its share of half of ``--deadline-ms``), then
    goes on with or without them (``bundle.format.average_channels``, as ``Bundle.predict`` does). A
    side-by-side or chain bundle has one stage and no exchange: the request is answered at once."""

    def __init__(self, bundle_dir: str | Path, index: int, broker: Broker, credentials: tuple[str, str],
                 link: Link | None = None, threads: int = 1, public_key: Path | None = None,
                 deadline_ms: float = defaults.DEADLINE_MS) -> None:
        import onnxruntime as ort

        if index < 0:
            raise ValueError(f"--index {index}: device indices start at 0")
        if deadline_ms <= 0:
            raise ValueError(f"--deadline-ms {deadline_ms}: must be > 0")
        root, manifest = read_manifest(bundle_dir, part=index, public_key=public_key)
        if index >= len(manifest["devices"]):
            raise ValueError(f"--index {index}: the bundle has devices 0..{len(manifest['devices']) - 1}")
        entry = manifest["devices"][index]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.sessions = [ort.InferenceSession(str(root / f), sess_options=options, providers=["CPUExecutionProvider"])
                         for f in model_files(entry)]
        self.index = index
        self.key = bundle_key(manifest["manifest_sha256"][:12])
        self.input_shape = tuple(manifest["input"]["shape"])
        self.upstream = manifest["devices"][index - 1] if is_chain(manifest) and index > 0 else None
        scales = manifest["transport"].get("scales")
        self.scale = float(scales[index]) if scales else 0.0
        self.dtype = np.dtype(manifest["transport"]["dtype"])
        self.exchanges = exchanges(manifest)
        self.exchange_wait_s = defaults.exchange_wait_ms(deadline_ms, len(self.exchanges)) / 1000.0
        self.map_shapes = {s: tuple(entry["stages"][s]["output_shape"]) for s in self.exchanges}
        self.parked: dict[int, Parked] = {}  # request -> waiting at an exchange
        # (request, stage) -> (first arrival, every message for it so far): which one carries the request's rows is
        # known only at the exchange
        self.early: collections.OrderedDict[tuple[int, int], tuple[float, list[np.ndarray]]] = collections.OrderedDict()
        self.finished: collections.OrderedDict[int, None] = collections.OrderedDict()  # requests done, for late peers
        self.lock = threading.Lock()  # paho's thread (messages) and the serve loop (waits that expire) share state
        self.missed = 0  # exchanges that went on without the peer's message
        super().__init__(entry["name"], manifest["manifest_sha256"][:12], broker, credentials, link)
        first, *peers = reads(manifest, index)
        self.out_topic, *exchange_topics = (topic(self.bundle_id, *t) for t in writes(manifest, index))
        self.exchange_topics = dict(zip(sorted(self.exchanges), exchange_topics))
        self.on(topic(self.bundle_id, *first), self._infer)
        for s, peer in zip(sorted(self.exchanges), peers):
            self.on(topic(self.bundle_id, *peer), lambda data, s=s: self._peer(s, data))

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
        with self.lock:
            if self.exchanges and (message.request in self.parked or message.request in self.finished):
                raise WireError("duplicate")  # a staged request's state must not be overwritten
            self._run(message.request, 0, inputs)

    def _peer(self, stage: int, data: bytes) -> None:
        """A peer's message for the exchange after ``stage``: sent by the device the route names (the topic's
        ACL lets only that credential publish it; a header naming another is dropped as spoofed)."""
        exchange = self.exchanges[stage]
        if peek_device(data) != exchange["route"][self.index]:
            raise WireError("spoofed")
        rows_shape = (exchange["channels"], *self.map_shapes[stage][1:])
        message = decode(data, self.key, KIND_DEVICE, rows_shape, (self.dtype,))
        with self.lock:
            parked = self.parked.get(message.request)
            if parked is not None and parked.stage == stage:
                if not self._fits(message.payload, parked.fmap):
                    return
                del self.parked[message.request]
                self._run(message.request, stage + 1, average_channels(parked.fmap, message.payload))
            elif message.request in self.finished or (parked is not None and parked.stage > stage):
                self.dropped["late"] += 1
            else:
                self._hold(message.request, stage, message.payload)

    def _fits(self, payload: np.ndarray, fmap: np.ndarray) -> bool:
        """A peer's message must carry the request's rows, whether it arrived at the exchange or was held
        before it: one that does not is dropped as malformed, and the request waits on (lock held)."""
        if len(payload) == len(fmap):
            return True
        self.dropped["malformed"] += 1
        return False

    def _hold(self, request: int, stage: int, payload: np.ndarray) -> None:
        """A peer's message that came before this device reached the exchange: kept for one wait, a bounded
        number of them. Every message for the exchange is kept, not only the first, so that one with the
        wrong rows (from the peer's credential) cannot crowd out the real one that follows it."""
        _, held = self.early.setdefault((request, stage), (time.monotonic(), []))
        held.append(payload)
        while sum(len(h) for _, h in self.early.values()) > EARLY_MESSAGES:
            self.dropped["unsolicited"] += len(self.early.popitem(last=False)[1][1])

    def _claim(self, request: int, stage: int, fmap: np.ndarray) -> np.ndarray | None:
        """The held message for this exchange that carries the request's rows (the first, if several do:
        the others are duplicates); None if none does (lock held)."""
        _, held = self.early.pop((request, stage), (0.0, []))
        claimed = None
        for payload in held:
            if not self._fits(payload, fmap):
                continue
            if claimed is None:
                claimed = payload
            else:
                self.dropped["duplicate"] += 1
        return claimed

    def _run(self, request: int, stage: int, x: np.ndarray) -> None:
        """Run from ``stage`` until the answer is sent or an exchange has to wait for its peer (lock held)."""
        while True:
            start = time.perf_counter()
            y = run_model(self.sessions[stage], x)
            self.compute_s += time.perf_counter() - start
            exchange = self.exchanges.get(stage)
            if exchange is None:
                break
            sent = exchange_message(y, exchange, self.dtype)
            self.publish(self.exchange_topics[stage],
                         encode(KIND_DEVICE, self.key, request, sent, device=self.index), sent.nbytes)
            received = self._claim(request, stage, y)
            if received is None:
                self.parked[request] = Parked(stage, y, time.monotonic())
                return
            x, stage = average_channels(y, received), stage + 1
        self.computed += 1
        if self.exchanges:
            self.finished[request] = None
            while len(self.finished) > FINISHED_MEMORY:
                self.finished.popitem(last=False)
        out = encode(KIND_DEVICE, self.key, request, y, device=self.index, scale=self.scale)
        self.publish(self.out_topic, out, y.nbytes)

    def _expire(self) -> None:
        """Go on without the peer's message where the wait is over; forget held messages nobody claimed."""
        now = time.monotonic()
        with self.lock:
            for request in [r for r, p in self.parked.items() if now - p.since >= self.exchange_wait_s]:
                parked = self.parked.pop(request)
                self.missed += 1
                self._run(request, parked.stage + 1, parked.fmap)
            while self.early and now - next(iter(self.early.values()))[0] >= self.exchange_wait_s:
                self.dropped["unsolicited"] += len(self.early.popitem(last=False)[1][1])

    def serve(self) -> None:
        """Answer until SIGTERM/SIGINT; the network loop (and inference) runs in paho's thread, which
        reconnects when the broker goes away; this one lets exchange waits expire."""
        self.handle_signals()
        self.client.loop_start()
        self.announce()
        tick = min(0.1, self.exchange_wait_s / 4) if self.exchanges else 0.1
        while not self.stop.wait(tick):
            if self.exchanges:
                self._expire()
        self.close()
        self.client.loop_stop()

    def stats(self) -> dict:
        return {**super().stats(), "exchanges_missed": self.missed,
                "exchange_wait_ms": self.exchange_wait_s * 1000.0 if self.exchanges else None}
