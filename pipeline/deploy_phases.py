"""The measurement phases of ``nonn deploy``, all through the broker: every test image at batch 1 (accuracy
over the wire, latency, bytes and compute per inference), the same images pipelined (throughput), and
the fault drill (one device SIGKILLed and restarted mid-stream)."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bundle.format import Bundle, is_chain
from pipeline.fleet import GRACE_S, Answer, Fleet, Source
from serve import defaults
from serve.broker import SOURCE, device_name
from serve.mqtt import Link, read_credentials


@dataclass(frozen=True)
class DeployOptions:
    """How ``nonn deploy`` measures: the broker to use (None: start one), the aggregator's deadline, the
    throughput window, the fault drill, the emulated links, and whether the processes run elsewhere."""

    broker_url: str | None = None
    ca_file: str | None = None
    credentials_dir: Path | None = None
    deadline_ms: float = defaults.DEADLINE_MS
    window: int = defaults.WINDOW
    drill_images: int = defaults.DRILL_IMAGES
    drill_device: int = defaults.DRILL_DEVICE
    link: Link = Link()
    progress: bool = True
    external: bool = False
    public_key: Path | None = None  # refuse a bundle not signed by this key (passed to every process deploy starts)


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
            source.wait_for(lambda: sum(r not in source.answers for r in requests[-window:]) < window, timeout_s)
            requests.append(source.send(images[i:i + 1]))
            bar.update(1)
        source.wait_for(lambda: all(r in source.answers for r in requests), timeout_s)
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


def measure_bundle(bundle_dir: Path, manifest: dict, fleet: Fleet, source_credentials: Path, images: np.ndarray,
                   labels: np.ndarray, options: DeployOptions) -> dict:
    """Start one bundle's processes and run the three phases through the broker; returns its measures."""
    names = [device_name(i) for i in range(len(manifest["devices"]))] + ["aggregator"]
    if is_chain(manifest) or options.external:  # a chain has no answer with a device down; nobody to kill
        options = replace(options, drill_images=0)
    fleet.log_dir.mkdir(parents=True, exist_ok=True)
    source = None
    try:
        source = Source(fleet.broker, read_credentials(source_credentials), manifest["manifest_sha256"][:12],
                        manifest["num_classes"], fleet.link.for_role("source"))
        source.health = None if options.external else fleet.check_alive
        started = float("-inf") if options.external else time.perf_counter()
        for name in names if not options.external else []:
            fleet.start(name)
        source.wait_ready(names, started)
        measured = _run_phases(source, fleet, Bundle.load(bundle_dir, threads=1, public_key=options.public_key),
                               names, images, labels,
                               options, "MP " if is_chain(manifest) else "")
    finally:
        if source is not None:
            source.close()
        fleet.stop()
    return {"bundle": str(bundle_dir), "bundle_id": manifest["manifest_sha256"][:12], "devices": len(names) - 1,
            "topology": manifest["topology"], "transport": manifest["transport"]["name"],
            **_summary(source, measured, names, labels, options.window)}


def _run_phases(source: Source, fleet: Fleet, reference: Bundle, names: list[str], images: np.ndarray,
                labels: np.ndarray, options: DeployOptions, tag: str) -> dict:
    """Batch 1, pipelined, then the drill: what each phase returned, and the stats around them."""
    n = len(images)
    timeout_s = fleet.deadline_ms / 1000.0 + GRACE_S + fleet.link.delay_s(images[:1].nbytes) * 4
    expected = reference.predict_batches(images).argmax(1)
    before = source.collect_stats(names)
    source_bytes = source.client.bytes_sent, source.sent_payload_bytes
    sequential = stream_sequential(source, images, timeout_s, f"{tag}batch 1", options.progress)
    after = source.collect_stats(names)
    fleet.check_alive()
    per_process = _per_inference(before, after, n)
    per_process[SOURCE] = {"payload_bytes": (source.sent_payload_bytes - source_bytes[1]) / n,
                           "wire_bytes": (source.client.bytes_sent - source_bytes[0]) / n, "compute_ms": None}
    requests, seconds = stream_pipelined(source, images, options.window, timeout_s, options.progress)
    k = options.drill_images
    drill = fault_drill(source, fleet, images[:k], labels[:k], options.drill_device, timeout_s, reference,
                        options.progress) if k else None
    return {"expected": expected, "sequential": sequential, "per_process": per_process, "requests": requests,
            "seconds": seconds, "drill": drill, "final": source.collect_stats(names)}


def _summary(source: Source, m: dict, names: list[str], labels: np.ndarray, window: int) -> dict:
    """The phases' results as the report's measures."""
    n, expected, sequential, drill, per_process = len(labels), m["expected"], m["sequential"], m["drill"], m["per_process"]
    answered = [(a, t) for _, a, t in sequential if a is not None]
    predictions = np.array([a.logits[0].argmax() if a is not None else -1 for _, a, _ in sequential])
    pipelined = [source.answers.get(r) for r in m["requests"]]
    pipelined_pred = np.array([a.logits[0].argmax() if a is not None else -1 for a in pipelined])
    devices, seconds = names[:-1], m["seconds"]
    lost = {"batch1": n - len(answered), "pipelined": sum(a is None for a in pipelined),
            "drill": drill["lost"] if drill else 0}
    lost["total"] = sum(lost.values())
    return {
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
        "dropped": {name: s.get("dropped", {}) for name, s in m["final"].items()} | {SOURCE: source.dropped},
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
