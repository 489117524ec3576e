"""``nonn deploy --select RUN_DIR ...``: serve with the most accurate bundle that meets a deadline, and switch
while streaming when the measured latency drifts past it (HALP's dynamic model selection).

Every candidate (a finished run: its ``export/`` and, for its accuracy, its ``report.json``) runs at once
behind one broker: its K device processes and its aggregator. Device i of every candidate is on device
i's link, so a link that slows slows all of them. The selection works in two steps:

1. **probe**: each candidate answers ``probes`` test images at batch 1, and its p95 latency is measured;
2. **serve**: the test images are streamed one at a time through the chosen candidate. Every
   ``probe_every`` requests, each other candidate answers the same image again, so its latency stays
   known. After every answer the choice is made again: the most accurate candidate whose p95 over
   its last ``window`` latencies meets the deadline (none meets it: the fastest).

``--change-link-at N`` slows device links before request N, as a degraded radio would (the
processes re-read their link file). The report records which bundle answered each request, every
switch and why, the accuracy of the mix over the wire, and whether each answer equals its own
bundle's prediction. Aggregators wait for every device here (their deadline is the answer timeout),
so that each answer is its bundle's whole prediction.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bundle.format import Bundle, read_manifest
from core.hardware import cpu_name
from core.io import read_json, write_json_atomic, write_text_atomic
from pipeline.deploy_phases import DeployOptions, percentiles_ms
from pipeline.fleet import GRACE_S, Fleet, Source, open_broker
from serve.broker import SOURCE, Users, device_name
from serve.mqtt import Link, read_credentials

ANSWER_TIMEOUT_S = 10.0  # an aggregator waits this long for its devices; an answer later than that is lost


@dataclass(frozen=True)
class LinkChange:
    """Before request ``at`` of the serving stream, devices ``devices`` get ``link``."""

    at: int
    link: Link
    devices: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class SelectPolicy:
    """How candidates are measured: ``probes`` images each before serving, every other candidate again
    every ``probe_every`` requests, and each judged by the p95 of its last ``window`` latencies."""

    probes: int = 10
    probe_every: int = 10
    window: int = 5


@dataclass
class Candidate:
    name: str
    bundle_dir: Path
    manifest: dict
    accuracy: float  # the bundle's test accuracy in the run's report.json
    expected: np.ndarray  # the bundle's own prediction for every streamed image
    recent: list[float] = field(default_factory=list)  # latest latencies (s)
    source: Source | None = None
    fleet: Fleet | None = None

    def p95_ms(self) -> float:
        return float(np.percentile(np.asarray(self.recent) * 1000.0, 95)) if self.recent else float("inf")


def load_candidates(run_dirs: list[Path], images: np.ndarray, public_key: Path | None = None) -> list[Candidate]:
    """Every run's bundle, its reported accuracy and its own predictions, most accurate first; runs that
    cannot be served together are refused in one line."""
    if len(run_dirs) < 2:
        raise ValueError("--select needs at least two run folders to choose between")
    candidates = []
    for run_dir in run_dirs:
        report_path = run_dir / "report.json"
        if not report_path.exists():
            raise ValueError(f"{run_dir}: no report.json; --select ranks candidates by their evaluated accuracy, "
                             "finish the run (`nonn run` or `nonn evaluate`) first")
        bundle_dir, manifest = read_manifest(run_dir / "export", public_key=public_key)
        accuracy = read_json(report_path, "report")["method"]["test_acc_bundle"]
        expected = Bundle.load(bundle_dir, threads=1, public_key=public_key).predict_batches(images).argmax(1)
        candidates.append(Candidate(run_dir.name, bundle_dir.resolve(), manifest, accuracy, expected))
    first = candidates[0].manifest
    for c in candidates[1:]:
        if c.manifest["input"]["shape"] != first["input"]["shape"] or c.manifest["class_names"] != first["class_names"]:
            raise ValueError(f"{c.name}: its bundle takes other images or classes than {candidates[0].name}'s; "
                             "candidates must serve the same task")
    if len({c.manifest["manifest_sha256"] for c in candidates}) < len(candidates):
        raise ValueError("two candidates are the same bundle; give each run once")
    return sorted(candidates, key=lambda c: -c.accuracy)


def choose(candidates: list[Candidate], deadline_ms: float) -> tuple[Candidate, str]:
    """The most accurate candidate whose recent p95 meets the deadline; none does: the fastest."""
    for c in candidates:
        if c.p95_ms() <= deadline_ms:
            return c, f"most accurate with p95 {c.p95_ms():.1f} ms <= {deadline_ms:g} ms"
    fastest = min(candidates, key=Candidate.p95_ms)
    return fastest, f"no candidate meets {deadline_ms:g} ms; the fastest, p95 {fastest.p95_ms():.1f} ms"


def ask(c: Candidate, image: np.ndarray, window: int) -> tuple[int | None, float]:
    """One request at batch 1 through ``c``: its predicted class (None: lost) and latency (s)."""
    request = c.source.send(image[None])
    answer = c.source.wait(request, ANSWER_TIMEOUT_S + GRACE_S)
    latency = (answer.received if answer else time.perf_counter()) - c.source.sent_at[request]
    c.recent = (c.recent + [latency])[-window:]
    return (None if answer is None else int(answer.logits.argmax())), latency


def write_link(folder: Path, device: int, link: Link) -> None:
    write_json_atomic(folder / f"{device_name(device)}.json", {"mbit_per_s": link.mbit_per_s,
                                                               "latency_ms": link.latency_ms})


def run_select(run_dirs: list[Path], out_dir: Path, images: np.ndarray, labels: np.ndarray, deadline_ms: float,
               options: DeployOptions = DeployOptions(), change: LinkChange | None = None,
               policy: SelectPolicy = SelectPolicy()) -> dict:
    """Probe, then serve ``images`` with the selection; writes select_report.json/.md into ``out_dir``."""
    if deadline_ms <= 0:
        raise ValueError(f"--deadline-ms {deadline_ms:g}: must be above 0")
    candidates = load_candidates(run_dirs, images, options.public_key)
    most = max(len(c.manifest["devices"]) for c in candidates)
    if change is not None and (change.at < 0 or any(not 0 <= d < most for d in change.devices)):
        raise ValueError(f"--change-link-at {change.at} / --change-link-devices {list(change.devices)}: a request "
                         f"index >= 0 and devices among 0..{most - 1}")
    work = out_dir / "deploy_select"
    links = work / "links"
    links.mkdir(parents=True, exist_ok=True)
    for stale in links.glob("*.json"):
        stale.unlink()
    users = [Users.of(c.manifest) for c in candidates]
    broker, credentials, broker_process = open_broker(options.broker_url, options.ca_file, options.credentials_dir,
                                                      users, work / "broker")
    try:
        for c, u in zip(candidates, users):
            files = {device_name(i): links / f"{device_name(i)}.json" for i in range(u.num_devices)}
            c.fleet = Fleet(c.bundle_dir, broker, u.own(credentials),
                            ANSWER_TIMEOUT_S * 1000.0, options.link, work / "logs" / u.bundle_id, broker_process,
                            files, public_key=options.public_key)
            c.fleet.log_dir.mkdir(parents=True, exist_ok=True)
            c.source = Source(broker, read_credentials(u.own(credentials)[SOURCE]), u.bundle_id,
                              c.manifest["num_classes"], options.link.for_role("source"))
            c.source.health = c.fleet.check_alive
            started = time.perf_counter()
            for name in u.names():
                c.fleet.start(name)
            c.source.wait_ready(u.names(), started)
        served = _serve(candidates, images, deadline_ms, change, links, policy)
    finally:
        for c in candidates:
            if c.source is not None:
                c.source.close()
            if c.fleet is not None:
                c.fleet.stop()
        if broker_process is not None:
            broker_process.terminate()
            broker_process.wait(timeout=10)
    report = _report(candidates, served, labels, deadline_ms, change, options)
    write_json_atomic(out_dir / "select_report.json", report)
    write_text_atomic(out_dir / "select_report.md", render_markdown(report))
    return report


def _serve(candidates: list[Candidate], images: np.ndarray, deadline_ms: float, change: LinkChange | None,
           links: Path, policy: SelectPolicy) -> dict:
    """The probe phase, then every image through the chosen candidate, probing the others on the way."""
    probes, probe_every, window = policy.probes, policy.probe_every, policy.window
    for c in candidates:
        for i in range(min(probes, len(images))):
            ask(c, images[i], window)
    probe_p95 = {c.name: c.p95_ms() for c in candidates}
    current, why = choose(candidates, deadline_ms)
    decisions = [{"request": 0, "time_s": 0.0, "to": current.name, "why": why, "p95_ms": probe_p95}]
    rows, probe_rows, changed_at = [], [], None
    start = time.perf_counter()
    for i, image in enumerate(images):
        if change is not None and i == change.at:
            for device in change.devices:
                write_link(links, device, change.link)
            changed_at = time.perf_counter() - start
        pred, latency = ask(current, image, window)
        rows.append({"request": i, "bundle": current.name, "latency_ms": round(1000 * latency, 3), "pred": pred,
                     "equal": pred == int(current.expected[i]), "time_s": round(time.perf_counter() - start, 4)})
        if i % probe_every == probe_every - 1:
            for c in candidates:
                if c is not current:
                    p, t = ask(c, image, window)
                    probe_rows.append({"request": i, "bundle": c.name, "latency_ms": round(1000 * t, 3),
                                       "equal": p == int(c.expected[i])})
        best, why = choose(candidates, deadline_ms)
        if best is not current:
            decisions.append({"request": i + 1, "time_s": round(time.perf_counter() - start, 4), "from": current.name,
                              "to": best.name, "why": why, "p95_ms": {c.name: round(c.p95_ms(), 3) for c in candidates}})
            current = best
    return {"rows": rows, "probes": probe_rows, "decisions": decisions, "probe_p95_ms": probe_p95,
            "changed_at_s": changed_at}


def _report(candidates: list[Candidate], served: dict, labels: np.ndarray, deadline_ms: float,
            change: LinkChange | None, options: DeployOptions) -> dict:
    rows = served["rows"]
    preds = np.array([-1 if r["pred"] is None else r["pred"] for r in rows])
    after_change = None
    if change is not None and served["changed_at_s"] is not None:
        moved = [d for d in served["decisions"][1:] if d["request"] > change.at]
        after_change = {"request": change.at, "time_s": round(served["changed_at_s"], 4),
                        "link": change.link.describe(), "devices": list(change.devices),
                        "first_switch_s": round(moved[0]["time_s"] - served["changed_at_s"], 4) if moved else None}
    by_bundle = {c.name: sum(r["bundle"] == c.name for r in rows) for c in candidates}
    return {
        "deadline_ms": deadline_ms, "images": len(rows), "link": options.link.describe(),
        "hardware": {"cpu": cpu_name(), "cores": os.cpu_count()},
        "candidates": [{"name": c.name, "bundle": str(c.bundle_dir), "bundle_id": c.manifest["manifest_sha256"][:12],
                        "method": c.manifest.get("method", "nonn"), "report_accuracy": c.accuracy,
                        "probe_p95_ms": round(served["probe_p95_ms"][c.name], 3), "served": by_bundle[c.name]}
                       for c in candidates],
        "accuracy_over_the_wire": float((preds == labels[:len(rows)]).mean()) if rows else None,
        "lost": sum(r["pred"] is None for r in rows),
        "answers_equal_their_bundle": all(r["equal"] for r in rows),
        "probes_equal_their_bundle": all(r["equal"] for r in served["probes"]),
        "latency_ms": percentiles_ms([r["latency_ms"] / 1000.0 for r in rows]),
        "met_deadline": sum(r["latency_ms"] <= deadline_ms for r in rows),
        "decisions": served["decisions"], "link_change": after_change,
        "requests": rows, "probes": served["probes"],
    }


def render_markdown(r: dict) -> str:
    lines = [f"# Deadline selection: {r['images']} requests, deadline {r['deadline_ms']:g} ms", "",
             f"{r['hardware']['cpu']}, {r['hardware']['cores']} cores; every candidate's processes on this machine.", "",
             "| candidate | method | accuracy (report) | probe p95 (ms) | requests served |", "|---|---|---|---|---|"]
    for c in r["candidates"]:
        lines.append(f"| {c['name']} | {c['method']} | {c['report_accuracy']:.4f} | {c['probe_p95_ms']:.1f} | "
                     f"{c['served']} |")
    lat = r["latency_ms"]
    lines += ["", f"Accuracy over the wire of the mix: {r['accuracy_over_the_wire']:.4f}; lost requests: {r['lost']}; "
              f"every answer equals its own bundle's prediction: {r['answers_equal_their_bundle']}; "
              f"{r['met_deadline']} of {r['images']} within the deadline; latency p50 / p95 / max "
              f"{lat.get('p50', 0):.1f} / {lat.get('p95', 0):.1f} / {lat.get('max', 0):.1f} ms.", ""]
    change = r["link_change"]
    if change:
        switch = "no switch" if change["first_switch_s"] is None else f"first switch {change['first_switch_s']:.3f} s later"
        lines += [f"Link change before request {change['request']}: devices {change['devices']} to "
                  f"{change['link']['mbit_per_s']} Mbit/s, {change['link']['latency_ms'] or 0} ms; {switch}.", ""]
    lines += ["| before request | at (s) | to | why |", "|---|---|---|---|"]
    for d in r["decisions"]:
        lines.append(f"| {d['request']} | {d['time_s']:.3f} | {d['to']} | {d['why']} |")
    return "\n".join(lines) + "\n"
