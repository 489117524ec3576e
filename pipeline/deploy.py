"""``nonn deploy``: the bundle as K+1 real processes behind a real broker, measured on the wire.

Phases, all through the broker: (1) every test image at batch 1, one at a time: accuracy over the
wire, end-to-end latency percentiles, bytes per inference (counted at each client's socket) and
per-process compute time; (2) the same images pipelined (``window`` requests in flight):
throughput; (3) the fault drill: one device process is SIGKILLed a third of the way into a stream
and restarted at two thirds; every request must still be answered (the aggregator answers at its
deadline at the latest), the answers while it is down must equal the bundle's own predictions with
that device missing, and it must rejoin. Writes ``deploy_report.json`` and ``deploy_report.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bundle.format import Bundle, is_chain, read_manifest
from core.hardware import cpu_name
from core.io import write_json_atomic, write_text_atomic
from imagedata.data import ImageDataModule
from pipeline.config import load_config
from serve import defaults
from serve.broker import SOURCE, Users, device_name, free_port, start_broker, write_broker_files
from serve.endpoint import STATS_REQUEST
from serve.mqtt import Broker, Link, RuntimeSetupError, connect, read_credentials, topic
from serve.wire import KIND_INPUT, KIND_OUTPUT, WireError, bundle_key, decode, encode

GRACE_S = 2.0  # how long past the deadline an answer may take before its request counts as lost
READY_TIMEOUT_S = 60.0


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

    def wait(self, request: int, timeout_s: float) -> Answer | None:
        with self.cond:
            self.cond.wait_for(lambda: request in self.answers, timeout=timeout_s)
            return self.answers.get(request)

    def wait_ready(self, names: list[str], since: float, timeout_s: float = READY_TIMEOUT_S) -> None:
        def ready() -> bool:
            latest = {}
            for t, name, payload in self.status:
                if t >= since:
                    latest[name] = payload
            return all(latest.get(n) == b"ready" for n in names)

        with self.cond:
            if not self.cond.wait_for(ready, timeout=timeout_s):
                raise RuntimeSetupError(f"{', '.join(names)} did not report ready within {timeout_s:.0f} s")

    def collect_stats(self, names: list[str], timeout_s: float = 60.0) -> dict[str, dict]:
        with self.cond:
            self.stats = {}
        self.client.publish(topic(self.bundle_id, "control"), STATS_REQUEST, qos=1)
        with self.cond:
            if not self.cond.wait_for(lambda: all(n in self.stats for n in names), timeout=timeout_s):
                missing = sorted(set(names) - set(self.stats))
                raise RuntimeSetupError(f"no stats from {', '.join(missing)} within {timeout_s:.0f} s")
            return dict(self.stats)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Fleet:
    """The runtime processes ``nonn deploy`` starts: optionally the broker, K devices, the aggregator."""

    def __init__(self, bundle_dir: Path, broker: Broker, credentials: dict[str, Path], deadline_ms: float,
                 link: Link, log_dir: Path) -> None:
        self.bundle_dir, self.broker, self.credentials = bundle_dir, broker, credentials
        self.deadline_ms, self.link, self.log_dir = deadline_ms, link, log_dir
        self.processes: dict[str, subprocess.Popen] = {}

    def _command(self, role: str, *extra: str) -> list[str]:
        cmd = [sys.executable, "-m", "serve", "serve", role, "--bundle", str(self.bundle_dir),
               "--broker", self.broker.url, *extra]
        if self.broker.ca_file:
            cmd += ["--ca-file", self.broker.ca_file]
        link = self.link.for_role(role)
        if link.mbit_per_s:
            cmd += ["--link-mbit", str(link.mbit_per_s)]
        if link.latency_ms:
            cmd += ["--link-ms", str(link.latency_ms)]
        return cmd

    def start(self, name: str) -> None:
        if name == "aggregator":
            cmd = self._command("aggregator", "--credentials", str(self.credentials[name]),
                                "--deadline-ms", str(self.deadline_ms))
        else:
            index = int(name.split("_")[1])
            cmd = self._command("device", "--index", str(index), "--credentials", str(self.credentials[name]))
        log = open(self.log_dir / f"{name}.log", "ab")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.processes[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def kill(self, name: str) -> None:
        self.processes[name].kill()
        self.processes[name].wait()

    def check_alive(self) -> None:
        for name, p in self.processes.items():
            if p.poll() is not None:
                log = (self.log_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()
                raise RuntimeSetupError(f"{name} exited with code {p.returncode}: {log[-1] if log else ''} "
                                        f"(log: {self.log_dir / f'{name}.log'})")

    def stop(self) -> None:
        for p in self.processes.values():
            if p.poll() is None:
                p.terminate()
        for p in self.processes.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr, mininterval=0.5)


def stream_sequential(source: Source, images: np.ndarray, timeout_s: float, desc: str, progress: bool,
                      on_step=None) -> list[tuple[int, Answer | None, float]]:
    """One request at a time, batch 1: (request, answer or None when lost, send time) per image."""
    results = []
    with _progress(len(images), desc, progress) as bar:
        for i in range(len(images)):
            if on_step is not None:
                on_step(i)
            request = source.send(images[i:i + 1])
            results.append((request, source.wait(request, timeout_s), source.sent_at[request]))
            bar.update(1)
    return results


def stream_pipelined(source: Source, images: np.ndarray, window: int, timeout_s: float,
                     progress: bool) -> tuple[list[int], float]:
    """``window`` requests in flight at batch 1; returns the requests and the seconds from first send to
    last answer."""
    requests: list[int] = []
    start = time.perf_counter()
    with _progress(len(images), "pipelined", progress) as bar:
        for i in range(len(images)):
            with source.cond:
                source.cond.wait_for(lambda: sum(r not in source.answers for r in requests[-window:]) < window,
                                     timeout=timeout_s)
            requests.append(source.send(images[i:i + 1]))
            bar.update(1)
        with source.cond:
            source.cond.wait_for(lambda: all(r in source.answers for r in requests), timeout=timeout_s)
    done = [source.answers[r].received for r in requests if r in source.answers]
    return requests, (max(done) - start) if done else float("nan")


def percentiles_ms(latencies_s: list[float]) -> dict:
    ms = np.asarray(latencies_s) * 1000.0
    if not len(ms):
        return {}
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "max": float(ms.max()), "mean": float(ms.mean())}


def _per_inference(before: dict, after: dict, n: int) -> dict:
    out = {}
    for name in after:
        a, b = after[name], before[name]
        computed = a["computed"] - b["computed"]
        out[name] = {"payload_bytes": (a["sent_payload_bytes"] - b["sent_payload_bytes"]) / n,
                     "wire_bytes": (a["socket_bytes_sent"] - b["socket_bytes_sent"]) / n,
                     "compute_ms": 1000.0 * (a["compute_s"] - b["compute_s"]) / computed if computed else None}
    return out


def run_config(run_dir: Path | None, manifest: dict) -> dict:
    """The run's resolved config when there is one, else the defaults for the bundle's dataset."""
    if run_dir is not None and (run_dir / "config.yaml").exists():
        return load_config(run_dir / "config.yaml", [])
    config = load_config(None, [])
    config["data"]["dataset"] = manifest.get("dataset", config["data"]["dataset"])
    return config


def test_split(data: dict, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The test images (uint8) and labels, read by the data module the evaluate stage uses."""
    dm = ImageDataModule(dict(data, data_dir=data_dir) if data_dir is not None else data, seed=0)
    dm.setup()  # the test split depends on the data config alone, not on the run's seed
    return dm.test[0].numpy(), dm.test[1].numpy()


def run_deploy(bundle_dir: Path, out_dir: Path, images: np.ndarray, labels: np.ndarray, *,
               mp_bundle: Path | None = None, broker_url: str | None = None, ca_file: str | None = None,
               credentials_dir: Path | None = None, deadline_ms: float = defaults.DEADLINE_MS, window: int = defaults.WINDOW,
               drill_images: int = defaults.DRILL_IMAGES, drill_device: int = defaults.DRILL_DEVICE, link: Link | None = None,
               bundle_report: dict | None = None, progress: bool = True, external: bool = False) -> dict:
    """Measure ``bundle_dir`` (and ``mp_bundle``, through the same broker) and write deploy_report.json/.md
    into ``out_dir``; returns the report: the bundle's measures, with the MP bundle's under ``model_parallel``.

    ``external``: the device and aggregator processes run elsewhere (started by hand on other machines);
    deploy waits for their ``ready`` status and skips the fault drill, which needs to kill one.
    """
    if external and broker_url is None:
        raise ValueError("--external needs --broker: the processes elsewhere must reach the same broker")
    link = link or Link()
    manifests = {path: read_manifest(path)[1] for path in [bundle_dir, *([mp_bundle] if mp_bundle else [])]}
    num_devices = len(manifests[bundle_dir]["devices"])
    if not 0 <= drill_device < num_devices:
        raise ValueError(f"--drill-device {drill_device}: the bundle has devices 0..{num_devices - 1}")
    if window < 1:
        raise ValueError(f"--window {window}: must be >= 1")
    if deadline_ms <= 0:
        raise ValueError(f"--deadline-ms {deadline_ms:g}: must be above 0")
    work = out_dir / "deploy"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    users = {path: Users.of(m) for path, m in manifests.items()}
    broker_process = None
    if broker_url is None:
        port = free_port()
        credentials = write_broker_files(work / "broker", list(users.values()), port)
        broker_process = start_broker(work / "broker", port)
        broker = Broker("127.0.0.1", port)
    else:
        if credentials_dir is None:
            raise ValueError("--broker needs --credentials-dir (the credentials/ folder 'nonn serve broker' wrote)")
        broker = Broker.parse(broker_url, ca_file)
        credentials = {f"{u.bundle_id}/{n}": credentials_dir / u.bundle_id / f"{n}.json"
                       for u in users.values() for n in u.names()} | {SOURCE: credentials_dir / f"{SOURCE}.json"}
    setting = {"broker": broker.url, "broker_started_by_deploy": broker_process is not None,
               "processes": "external" if external else "started by deploy on this machine",
               "link": link.describe(), "deadline_ms": deadline_ms,
               "hardware": {"cpu": cpu_name(), "cores": os.cpu_count()}, "images": len(images)}
    try:
        sections = {}
        for path, manifest in manifests.items():
            u = users[path]
            fleet = Fleet(path.resolve(), broker, {n: credentials[f"{u.bundle_id}/{n}"] for n in u.names()},
                          deadline_ms, link, work / "logs" / u.bundle_id)
            chain = is_chain(manifest)
            sections[path] = measure_bundle(path, manifest, fleet, credentials[SOURCE], images, labels,
                                            window=window, drill_images=0 if chain or external else drill_images,
                                            drill_device=drill_device, progress=progress, external=external)
    finally:
        if broker_process is not None:
            broker_process.terminate()
            broker_process.wait(timeout=10)
    report = {**setting, "method": manifests[bundle_dir].get("method", "nonn"), **sections[bundle_dir]}
    report["accuracy"]["bundle_report"] = (bundle_report or {}).get("test_acc_bundle")
    if report["drill"] and bundle_report:  # the evaluate stage's figure for the same device missing, all images
        report["drill"]["failure_table_accuracy"] = next(
            (f["accuracy"] for f in bundle_report.get("failures", []) if f["missing"] == [drill_device]), None)
    if mp_bundle is not None:
        mp = sections[mp_bundle]
        report["model_parallel"] = mp
        report["vs_mp"] = {
            "latency_p50_ratio": mp["latency_ms_batch1"]["p50"] / report["latency_ms_batch1"]["p50"],
            "bytes_on_the_wire_ratio": _wire_total(mp) / _wire_total(report)}
    write_reports(out_dir, report)
    return report


def _wire_total(section: dict) -> float:
    """Bytes on the wire per inference, every sender together (input, devices, answer)."""
    return sum(p["wire_bytes"] for p in section["per_inference"].values())


def measure_bundle(bundle_dir: Path, manifest: dict, fleet: Fleet, source_credentials: Path, images: np.ndarray,
                   labels: np.ndarray, *, window: int, drill_images: int, drill_device: int, progress: bool,
                   external: bool = False) -> dict:
    """Start one bundle's processes and run the three phases through the broker; returns its measures."""
    bundle_id = manifest["manifest_sha256"][:12]
    num_devices = len(manifest["devices"])
    names = [device_name(i) for i in range(num_devices)] + ["aggregator"]
    fleet.log_dir.mkdir(parents=True, exist_ok=True)
    source = None
    n = len(images)
    try:
        source = Source(fleet.broker, read_credentials(source_credentials), bundle_id, manifest["num_classes"],
                        fleet.link.for_role("source"))
        started = float("-inf") if external else time.perf_counter()
        for name in names if not external else []:
            fleet.start(name)
        source.wait_ready(names, started)
        timeout_s = fleet.deadline_ms / 1000.0 + GRACE_S + fleet.link.delay_s(images[:1].nbytes) * 4
        reference = Bundle.load(bundle_dir, threads=1)
        expected = reference.predict_batches(images).argmax(1)

        before = source.collect_stats(names)
        source_bytes = source.client.bytes_sent, source.sent_payload_bytes
        tag = "MP " if is_chain(manifest) else ""
        sequential = stream_sequential(source, images, timeout_s, f"{tag}batch 1", progress)
        after = source.collect_stats(names)
        fleet.check_alive()
        per_process = _per_inference(before, after, n)
        per_process[SOURCE] = {"payload_bytes": (source.sent_payload_bytes - source_bytes[1]) / n,
                               "wire_bytes": (source.client.bytes_sent - source_bytes[0]) / n, "compute_ms": None}
        requests, seconds = stream_pipelined(source, images, window, timeout_s, progress)
        drill = fault_drill(source, fleet, images[:drill_images], labels[:drill_images], drill_device, timeout_s,
                            reference, progress) if drill_images else None
        final = source.collect_stats(names)
    finally:
        if source is not None:
            source.close()
        fleet.stop()

    answered = [(a, t) for _, a, t in sequential if a is not None]
    predictions = np.array([a.logits[0].argmax() if a is not None else -1 for _, a, _ in sequential])
    pipelined = [source.answers.get(r) for r in requests]
    pipelined_pred = np.array([a.logits[0].argmax() if a is not None else -1 for a in pipelined])
    devices = names[:-1]
    lost = {"batch1": n - len(answered), "pipelined": sum(a is None for a in pipelined),
            "drill": drill["lost"] if drill else 0}
    lost["total"] = sum(lost.values())
    return {
        "bundle": str(bundle_dir), "bundle_id": bundle_id, "devices": num_devices,
        "topology": "chain" if is_chain(manifest) else "parallel", "transport": manifest["transport"]["name"],
        "accuracy": {"over_the_wire": float((predictions == labels).mean()),
                     "bundle_in_process": float((expected == labels).mean()),
                     "predictions_equal_bundle": bool((predictions == expected).all()),
                     "pipelined_predictions_equal_bundle": bool((pipelined_pred == expected).all())},
        "latency_ms_batch1": percentiles_ms([a.received - t for a, t in answered]),
        "throughput": {"inferences_per_s": n / seconds if seconds == seconds and seconds > 0 else None,
                       "window": window, "seconds": seconds,
                       "answered_with_devices_missing": sum(a is not None and a.flags != 0 for a in pipelined)},
        "per_inference": per_process,
        "bytes_per_inference": {
            "input_payload": per_process[SOURCE]["payload_bytes"], "input_wire": per_process[SOURCE]["wire_bytes"],
            "devices_payload": sum(per_process[d]["payload_bytes"] for d in devices),
            "devices_wire": sum(per_process[d]["wire_bytes"] for d in devices),
            "answer_payload": per_process["aggregator"]["payload_bytes"],
            "answer_wire": per_process["aggregator"]["wire_bytes"]},
        "requests": 2 * n + (drill["requests"] if drill else 0),
        "lost": lost,
        "drill": drill,
        "dropped": {name: s.get("dropped", {}) for name, s in final.items()} | {SOURCE: source.dropped},
    }


def fault_drill(source: Source, fleet: Fleet, images: np.ndarray, labels: np.ndarray, device: int,
                timeout_s: float, reference: Bundle, progress: bool) -> dict:
    """SIGKILL ``device`` a third of the way in, restart it at two thirds, keep streaming throughout."""
    name = device_name(device)
    n = len(images)
    kill_at, restart_at = n // 3, (2 * n) // 3
    events: dict[str, float] = {}

    def step(i: int) -> None:
        if i == kill_at:
            fleet.kill(name)
            events["killed"] = time.perf_counter()
        elif i == restart_at:
            events["restarted"] = time.perf_counter()
            fleet.start(name)

    results = stream_sequential(source, images, timeout_s, f"drill (kill {name})", progress, step)
    source.wait_ready([name], events["restarted"])
    tail = stream_sequential(source, images[:1], timeout_s, "after rejoin", False)
    fleet.check_alive()
    full = reference.predict_batches(images).argmax(1)
    without = reference.predict_batches(images, missing=[device]).argmax(1)
    bit = 1 << device
    flags = np.array([a.flags if a is not None else -1 for _, a, _ in results])
    predictions = np.array([a.logits[0].argmax() if a is not None else -1 for _, a, _ in results])
    down = flags == bit
    whole = flags == 0
    latencies = [a.received - t for _, a, t in results if a is not None]
    rejoined = [a.received - events["restarted"] for _, a, t in results[restart_at:]
                if a is not None and a.flags == 0]
    return {
        "device": name, "requests": n + 1, "lost": int((flags == -1).sum()) + int(tail[0][1] is None),
        "killed_at_request": kill_at, "restarted_at_request": restart_at,
        "answered_without_device": int(down.sum()), "answered_whole": int(whole.sum()),
        "other_flags": int(((flags != bit) & (flags != 0) & (flags != -1)).sum()),
        "predictions_equal_bundle_missing_device": bool((predictions[down] == without[down]).all()),
        "accuracy_without_device": float((predictions[down] == labels[down]).mean()) if down.any() else None,
        "accuracy_whole": float((predictions[whole] == labels[whole]).mean()) if whole.any() else None,
        "predictions_equal_bundle_whole": bool((predictions[whole] == full[whole]).all()),
        "latency_ms": percentiles_ms(latencies),
        "rejoined_after_restart_ms": 1000.0 * rejoined[0] if rejoined else None,
        "answered_whole_after_rejoin": bool(tail[0][1] is not None and tail[0][1].flags == 0),
    }


def write_reports(out_dir: Path, report: dict) -> None:

    write_json_atomic(out_dir / "deploy_report.json", report)
    write_text_atomic(out_dir / "deploy_report.md", render_markdown(report))


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render_markdown(r: dict) -> str:
    link = r["link"]
    senders = "every sender: source, devices, aggregator" if link.get("scope", "all") == "all" else "the devices only"
    shaped = (f"emulated links: {link['mbit_per_s'] or 'unlimited'} Mbit/s, {link['latency_ms'] or 0} ms per message "
              f"(applied by {senders})") if link["emulated"] else "loopback, no link emulation"
    lat, acc, b = r["latency_ms_batch1"], r["accuracy"], r["bytes_per_inference"]
    lines = [f"# Deployment report: bundle {r['bundle_id']} ({r['devices']} devices, {r['transport']} transport)", "",
             f"Broker {r['broker']}; {shaped}; {r['hardware']['cpu']}, {r['hardware']['cores']} cores; "
             f"deadline {r['deadline_ms']:g} ms; {r['images']} test images.", "",
             "| measure | value |", "|---|---|",
             f"| accuracy over the wire | {acc['over_the_wire']:.4f} |",
             f"| bundle accuracy in report.json | {_fmt(acc['bundle_report'], 4)} |",
             f"| every wire prediction equals the bundle's | {acc['predictions_equal_bundle']} |",
             f"| latency batch 1, p50 / p95 / p99 / max (ms) | {_fmt(lat.get('p50'))} / {_fmt(lat.get('p95'))} / "
             f"{_fmt(lat.get('p99'))} / {_fmt(lat.get('max'))} |",
             f"| throughput, {r['throughput']['window']} in flight (inferences/s) | "
             f"{_fmt(r['throughput']['inferences_per_s'], 1)} |",
             f"| answers past the deadline in that phase (devices filled in) | "
             f"{r['throughput']['answered_with_devices_missing']} |",
             f"| bytes per inference, input (payload / on the wire) | {b['input_payload']:.0f} / {b['input_wire']:.0f} |",
             f"| bytes per inference, all devices (payload / on the wire) | {b['devices_payload']:.0f} / "
             f"{b['devices_wire']:.0f} |",
             f"| bytes per inference, answer (payload / on the wire) | {b['answer_payload']:.0f} / "
             f"{b['answer_wire']:.0f} |",
             f"| lost requests (of {r['requests']}) | {r['lost']['total']} |", "",
             "| process | payload B/inference | wire B/inference | compute ms/inference |", "|---|---|---|---|"]
    for name, p in r["per_inference"].items():
        lines.append(f"| {name} | {p['payload_bytes']:.0f} | {p['wire_bytes']:.0f} | {_fmt(p['compute_ms'], 3)} |")
    mp = r.get("model_parallel")
    if mp:
        ml, mb = mp["latency_ms_batch1"], mp["bytes_per_inference"]
        name = r["method"]
        lines += ["", f"{name} against model parallelism (the teacher split layer-wise at MAC-balanced cuts over "
                  f"{mp['devices']} devices, each sending its feature map), same broker and links:", "",
                  f"| | {name} | MP |", "|---|---|---|",
                  f"| accuracy over the wire | {acc['over_the_wire']:.4f} | {mp['accuracy']['over_the_wire']:.4f} |",
                  f"| latency p50 / p99 (ms) | {_fmt(lat.get('p50'))} / {_fmt(lat.get('p99'))} | "
                  f"{_fmt(ml.get('p50'))} / {_fmt(ml.get('p99'))} |",
                  f"| throughput (inferences/s) | {_fmt(r['throughput']['inferences_per_s'], 1)} | "
                  f"{_fmt(mp['throughput']['inferences_per_s'], 1)} |",
                  f"| device bytes per inference, payload / wire | {b['devices_payload']:.0f} / {b['devices_wire']:.0f} | "
                  f"{mb['devices_payload']:.0f} / {mb['devices_wire']:.0f} |",
                  f"| all bytes on the wire per inference (input, devices, answer) | {_wire_total(r):.0f} | "
                  f"{_wire_total(mp):.0f} |",
                  f"| lost requests | {r['lost']['total']} | {mp['lost']['total']} |", "",
                  f"MP's p50 latency is {r['vs_mp']['latency_p50_ratio']:.1f}x {name}'s; it puts "
                  f"{r['vs_mp']['bytes_on_the_wire_ratio']:.1f}x the bytes on the wire."]
    d = r["drill"]
    if d:
        dl = d["latency_ms"]
        lines += ["", f"Fault drill: {d['device']} SIGKILLed at request {d['killed_at_request']}, restarted at "
                  f"{d['restarted_at_request']}, of {d['requests']}. Lost: {d['lost']}. Answered without it: "
                  f"{d['answered_without_device']}, predictions equal to the bundle's with it missing: "
                  f"{d['predictions_equal_bundle_missing_device']}; accuracy while it was down "
                  f"{_fmt(d['accuracy_without_device'], 4)} on those images (failure table, every test image: "
                  f"{_fmt(d.get('failure_table_accuracy'), 4)}). Latency p50 / max {_fmt(dl.get('p50'))} / "
                  f"{_fmt(dl.get('max'))} ms. Rejoined {_fmt(d['rejoined_after_restart_ms'], 0)} ms after restart: "
                  f"{d['answered_whole_after_rejoin']}."]
    return "\n".join(lines) + "\n"


class Terminated(Exception):
    """SIGTERM arrived during ``nonn deploy``."""


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into an exception, so that every ``finally`` stops the broker, devices and aggregator
    it started, as SIGINT does (by default SIGTERM ends Python at once and leaves them running)."""
    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def deploy_from_args(args: argparse.Namespace) -> str:
    """``nonn deploy``: every option checked before the data is read or a process starts."""
    if args.broker and not args.credentials_dir:
        raise ValueError("--broker needs --credentials-dir (the credentials/ folder 'nonn serve broker' wrote)")
    if args.mp and args.run_dir is None:
        raise ValueError("--mp needs --run-dir: the model-parallel bundle is that run's export_mp/")
    run_dir = args.run_dir
    bundle_dir = (run_dir / "export") if run_dir else args.bundle
    home = run_dir or bundle_dir.resolve().parent
    mp_bundle = run_dir / "export_mp" if args.mp else None
    if mp_bundle is not None and not (mp_bundle / "manifest.json").exists():
        raise ValueError(f"{mp_bundle}: no model-parallel bundle; run `nonn export --force` on {run_dir} "
                         "(the export stage writes export_mp/ beside every method's export/ but MP's own)")
    _, manifest = read_manifest(bundle_dir)
    config = run_config(home, manifest)
    options = {key: getattr(args, key) if getattr(args, key) is not None else config["deploy"][key]
               for key in ("deadline_ms", "window", "drill_images", "drill_device")}
    link = Link(args.link_mbit, args.link_ms, args.link_scope)
    images, labels = test_split(config["data"], args.data_dir)
    if args.limit is not None:
        images, labels = images[:args.limit], labels[:args.limit]
    bundle_report = None
    if (home / "report.json").exists():
        saved = json.loads((home / "report.json").read_text())
        bundle_report = {**saved.get("method", {}), "failures": saved.get("failures", [])}
    out_dir = args.out or home
    with sigterm_unwinds():
        run_deploy(bundle_dir, out_dir, images, labels, mp_bundle=mp_bundle, broker_url=args.broker, ca_file=args.ca_file,
                   credentials_dir=args.credentials_dir, deadline_ms=options["deadline_ms"], window=options["window"],
                   drill_images=min(options["drill_images"], len(images)), drill_device=options["drill_device"],
                   link=link, bundle_report=bundle_report, progress=args.progress, external=args.external)
    return (out_dir / "deploy_report.md").read_text()
