"""What ``nonn deploy`` runs and talks to: the runtime processes it starts (``Fleet``) and the source
that publishes images and collects the aggregator's answers (``Source``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.processes import stop_processes
from serve.broker import SOURCE, Users, free_port, start_broker, write_broker_files
from serve.endpoint import STATS_REQUEST
from serve.mqtt import Broker, Link, RuntimeSetupError, connect, topic
from serve.wire import KIND_INPUT, KIND_OUTPUT, WireError, bundle_key, decode, encode

GRACE_S = 2.0  # how long past the deadline an answer may take before its request counts as lost
READY_TIMEOUT_S = 60.0
HEALTH_CHECK_S = 0.5  # how often a wait checks that the broker and every process still run


@dataclass
class Answer:
    received: float
    logits: np.ndarray
    flags: int


class Source:
    """Publishes images on ``input`` and collects the aggregator's answers (a camera and its consumer)."""

    def __init__(self, broker: Broker, credentials: tuple[str, str], bundle_id: str, num_classes: int,
                 link: Link) -> None:
        self.bundle_id, self.key, self.num_classes, self.link = bundle_id, bundle_key(bundle_id), num_classes, link
        self.answers: dict[int, Answer] = {}
        self.sent_at: dict[int, float] = {}
        self.status: list[tuple[float, str, bytes]] = []
        self.stats: dict[str, dict] = {}
        self.dropped = 0
        self.health: Callable[[], None] | None = None  # raises when a process it depends on died
        self.health_checked = 0.0  # time.monotonic() of the last call
        self.sent_payload_bytes = 0
        self.cond = threading.Condition()
        self.client = connect(broker, credentials, f"nonn-{bundle_id}-{SOURCE}-{os.getpid()}")
        self._on(topic(bundle_id, "out"), self._answer)
        self._on(topic(bundle_id, "status", "+"), self._status)
        self._on(topic(bundle_id, "stats", "+"), self._stats)
        self.client.loop_start()
        self.next_request = int(time.time() * 1000) << 16  # ids unique across runs on one broker

    def _on(self, topic_filter: str, handler) -> None:
        def callback(_c, _u, message) -> None:
            with self.cond:
                handler(message)
                self.cond.notify_all()

        self.client.message_callback_add(topic_filter, callback)
        self.client.subscribe(topic_filter, qos=1)

    def _answer(self, message) -> None:
        try:
            out = decode(message.payload, self.key, KIND_OUTPUT, (self.num_classes,), (np.dtype("float32"),))
        except WireError:
            self.dropped += 1
            return
        if out.request in self.sent_at and out.request not in self.answers:
            self.answers[out.request] = Answer(time.perf_counter(), out.payload.copy(), out.flags)

    def _status(self, message) -> None:
        self.status.append((time.perf_counter(), message.topic.rsplit("/", 1)[1], message.payload))

    def _stats(self, message) -> None:
        try:
            self.stats[message.topic.rsplit("/", 1)[1]] = json.loads(message.payload)
        except ValueError:
            self.dropped += 1

    def send(self, images: np.ndarray) -> int:
        request = self.next_request
        self.next_request += 1
        data = encode(KIND_INPUT, self.key, request, images)
        with self.cond:
            self.sent_at[request] = time.perf_counter()
        self.link.send(self.client, topic(self.bundle_id, "input"), data)
        self.sent_payload_bytes += images.nbytes
        return request

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until ``predicate`` holds (under the lock) or ``timeout_s`` passes, calling ``health`` every
        ``HEALTH_CHECK_S``: a dead process raises at once instead of letting every request time out."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            self._check_health(every_s=HEALTH_CHECK_S)  # also while answers come fast: a swapped bundle still answers
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, HEALTH_CHECK_S))
                if not predicate():
                    self._check_health()
            return True

    def _check_health(self, every_s: float = 0.0) -> None:
        if self.health is not None and time.monotonic() - self.health_checked >= every_s:
            self.health_checked = time.monotonic()
            self.health()

    def wait(self, request: int, timeout_s: float) -> Answer | None:
        self.wait_for(lambda: request in self.answers, timeout_s)
        with self.cond:
            return self.answers.get(request)

    def wait_ready(self, names: list[str], since: float, timeout_s: float = READY_TIMEOUT_S) -> None:
        def ready() -> bool:
            latest = {}
            for t, name, payload in self.status:
                if t >= since:
                    latest[name] = payload
            return all(latest.get(n) == b"ready" for n in names)

        if not self.wait_for(ready, timeout_s):
            raise RuntimeSetupError(f"{', '.join(names)} did not report ready within {timeout_s:.0f} s")

    def collect_stats(self, names: list[str], timeout_s: float = 60.0) -> dict[str, dict]:
        with self.cond:
            self.stats = {}
        self.client.publish(topic(self.bundle_id, "control"), STATS_REQUEST, qos=1)
        if not self.wait_for(lambda: all(n in self.stats for n in names), timeout_s):
            missing = sorted(set(names) - set(self.stats))
            raise RuntimeSetupError(f"no stats from {', '.join(missing)} within {timeout_s:.0f} s")
        with self.cond:
            return dict(self.stats)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Fleet:
    """The runtime processes ``nonn deploy`` starts: optionally the broker, K devices, the aggregator."""

    def __init__(self, bundle_dir: Path, broker: Broker, credentials: dict[str, Path], deadline_ms: float,
                 link: Link, log_dir: Path, broker_process: subprocess.Popen | None = None,
                 link_files: dict[str, Path] | None = None, public_key: Path | None = None) -> None:
        self.bundle_dir, self.broker, self.credentials = bundle_dir, broker, credentials
        self.deadline_ms, self.link, self.log_dir = deadline_ms, link, log_dir
        self.public_key = public_key  # each process refuses a bundle not signed by it
        self.link_files = link_files or {}  # process name -> a file that changes its link mid-run (LinkFile)
        self.processes: dict[str, subprocess.Popen] = {}
        self.killed: set[str] = set()  # stopped on purpose (the fault drill), not a death
        self.broker_process = broker_process  # the broker deploy started, watched like the others
        self.manifest = self._manifest_bytes()  # a re-export mid-run would mix two bundles in one report

    def _command(self, role: str, name: str, *extra: str) -> list[str]:
        cmd = [sys.executable, "-m", "serve", "serve", role, "--bundle", str(self.bundle_dir),
               "--broker", self.broker.url, *extra]
        if name in self.link_files:
            cmd += ["--link-file", str(self.link_files[name])]
        if self.broker.ca_file:
            cmd += ["--ca-file", self.broker.ca_file]
        if self.public_key is not None:
            cmd += ["--public-key", str(Path(self.public_key).resolve())]
        link = self.link.for_role(role)
        if link.mbit_per_s:
            cmd += ["--link-mbit", str(link.mbit_per_s)]
        if link.latency_ms:
            cmd += ["--link-ms", str(link.latency_ms)]
        return cmd

    def start(self, name: str) -> None:
        if name == "aggregator":
            cmd = self._command("aggregator", name, "--credentials", str(self.credentials[name]),
                                "--deadline-ms", str(self.deadline_ms))
        else:
            index = int(name.split("_")[1])
            cmd = self._command("device", name, "--index", str(index), "--credentials", str(self.credentials[name]),
                                "--deadline-ms", str(self.deadline_ms))
        log = open(self.log_dir / f"{name}.log", "ab")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.processes[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.killed.discard(name)

    def kill(self, name: str) -> None:
        self.killed.add(name)
        self.processes[name].kill()
        self.processes[name].wait()

    def _manifest_bytes(self) -> bytes | None:
        try:
            return (self.bundle_dir / "manifest.json").read_bytes()
        except OSError:
            return None

    def check_alive(self) -> None:
        """Raise, naming it, if the broker or a process died (other than one the drill stopped), or if the
        bundle was replaced while its processes run (a restarted device would load the new one)."""
        if self._manifest_bytes() != self.manifest:
            raise RuntimeSetupError(f"the bundle in {self.bundle_dir} changed while deploying (exported again?); "
                                    "the answers would mix two bundles: rerun nonn deploy")
        if self.broker_process is not None and self.broker_process.poll() is not None:
            raise RuntimeSetupError(f"the broker exited with code {self.broker_process.returncode} "
                                    f"(log: {self.log_dir.parent.parent / 'broker' / 'mosquitto.log'})")
        for name, p in self.processes.items():
            if name not in self.killed and p.poll() is not None:
                log = (self.log_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()
                raise RuntimeSetupError(f"{name} exited with code {p.returncode}: {log[-1] if log else ''} "
                                        f"(log: {self.log_dir / f'{name}.log'})")

    def stop(self) -> None:
        stop_processes(self.processes.values(), grace_s=5)


def open_broker(url: str | None, ca_file: str | None, credentials_dir: Path | None, users: list[Users],
                folder: Path) -> tuple[Broker, dict[str, Path], subprocess.Popen | None]:
    """(broker, credential files by process, the broker process or None): a broker started here on a free
    port, or the one at ``url`` with the credentials ``nonn serve broker`` wrote for it."""
    if url is None:
        port = free_port()
        credentials = write_broker_files(folder, users, port)
        return Broker("127.0.0.1", port), credentials, start_broker(folder, port)
    if credentials_dir is None:
        raise ValueError("--broker needs --credentials-dir (the credentials/ folder 'nonn serve broker' wrote)")
    credentials = {u.key(n): credentials_dir / f"{u.key(n)}.json" for u in users for n in u.accounts()}
    return Broker.parse(url, ca_file), credentials, None
