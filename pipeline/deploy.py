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
import json
import os
from pathlib import Path

import numpy as np

from bundle.format import read_manifest
from core.hardware import cpu_name
from core.signals import sigterm_unwinds
from imagedata.data import ImageDataModule
from pipeline.config import load_config
from pipeline.deploy_phases import DeployOptions, measure_bundle
from pipeline.deploy_report import wire_total, write_reports
from pipeline.deploy_select import LinkChange, run_select
from pipeline.fleet import Fleet, open_broker
from serve.broker import SOURCE, Users
from serve.mqtt import Link


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


def run_deploy(bundle_dir: Path, out_dir: Path, images: np.ndarray, labels: np.ndarray,
               options: DeployOptions = DeployOptions(), *, mp_bundle: Path | None = None,
               bundle_report: dict | None = None) -> dict:
    """Measure ``bundle_dir`` (and ``mp_bundle``, through the same broker) and write deploy_report.json/.md
    into ``out_dir``; returns the report: the bundle's measures, with the MP bundle's under ``model_parallel``.

    ``options.external``: the device and aggregator processes run elsewhere (started by hand on other
    machines); deploy waits for their ``ready`` status and skips the fault drill, which needs to kill one.
    """
    manifests = {path: read_manifest(path, public_key=options.public_key)[1]
                 for path in [bundle_dir, *([mp_bundle] if mp_bundle else [])]}
    _check_options(options, len(manifests[bundle_dir]["devices"]))
    work = out_dir / "deploy"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    users = {path: Users.of(m) for path, m in manifests.items()}
    broker, credentials, broker_process = open_broker(options.broker_url, options.ca_file, options.credentials_dir,
                                                      list(users.values()), work / "broker")
    setting = {"broker": broker.url, "broker_started_by_deploy": broker_process is not None,
               "processes": "external" if options.external else "started by deploy on this machine",
               "link": options.link.describe(), "deadline_ms": options.deadline_ms,
               "hardware": {"cpu": cpu_name(), "cores": os.cpu_count()}, "images": len(images)}
    try:
        sections = {}
        for path, manifest in manifests.items():
            u = users[path]
            files = u.own(credentials)
            fleet = Fleet(path.resolve(), broker, files, options.deadline_ms, options.link, work / "logs" / u.bundle_id,
                          broker_process, public_key=options.public_key)
            sections[path] = measure_bundle(path, manifest, fleet, files[SOURCE], images, labels, options)
    finally:
        if broker_process is not None:
            broker_process.terminate()
            broker_process.wait(timeout=10)
    report = {**setting, "method": manifests[bundle_dir].get("method", "nonn"), **sections[bundle_dir]}
    report["accuracy"]["bundle_report"] = (bundle_report or {}).get("test_acc_bundle")
    if report["drill"] and bundle_report:  # the evaluate stage's figure for the same device missing, all images
        report["drill"]["failure_table_accuracy"] = next(
            (f["accuracy"] for f in bundle_report.get("failures", []) if f["missing"] == [options.drill_device]),
            None)
    if mp_bundle is not None:
        mp = sections[mp_bundle]
        report["model_parallel"] = mp
        report["vs_mp"] = {
            "latency_p50_ratio": mp["latency_ms_batch1"]["p50"] / report["latency_ms_batch1"]["p50"],
            "bytes_on_the_wire_ratio": wire_total(mp) / wire_total(report)}
    write_reports(out_dir, report)
    return report


def _check_options(options: DeployOptions, num_devices: int) -> None:
    if options.external and options.broker_url is None:
        raise ValueError("--external needs --broker: the processes elsewhere must reach the same broker")
    if not 0 <= options.drill_device < num_devices:
        raise ValueError(f"--drill-device {options.drill_device}: the bundle has devices 0..{num_devices - 1}")
    if options.window < 1:
        raise ValueError(f"--window {options.window}: must be >= 1")
    if options.deadline_ms <= 0:
        raise ValueError(f"--deadline-ms {options.deadline_ms:g}: must be above 0")


def deploy_from_args(args: argparse.Namespace) -> str:
    """``nonn deploy``: every option checked before the data is read or a process starts."""
    if args.select:
        return select_from_args(args)
    if args.change_link_at is not None:
        raise ValueError("--change-link-at works with --select (the selection reacts to it)")
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
    settings = {key: getattr(args, key) if getattr(args, key) is not None else config["deploy"][key]
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
    options = DeployOptions(args.broker, args.ca_file, args.credentials_dir, settings["deadline_ms"],
                            settings["window"], min(settings["drill_images"], len(images)), settings["drill_device"],
                            link, args.progress, args.external, args.public_key)
    with sigterm_unwinds():
        run_deploy(bundle_dir, out_dir, images, labels, options, mp_bundle=mp_bundle, bundle_report=bundle_report)
    return (out_dir / "deploy_report.md").read_text()


def select_from_args(args: argparse.Namespace) -> str:
    """``nonn deploy --select RUN_DIR ...``: the deadline selection (``pipeline.deploy_select``)."""
    if args.mp or args.external:
        raise ValueError("--select runs every candidate's processes itself; leave out --mp and --external")
    if args.deadline_ms is None:
        raise ValueError("--select needs --deadline-ms: the latency the chosen bundle must meet")
    change = None
    if args.change_link_at is not None:
        if args.change_link_mbit is None and args.change_link_ms is None:
            raise ValueError("--change-link-at needs --change-link-mbit and/or --change-link-ms")
        try:
            devices = tuple(int(d) for d in args.change_link_devices.split(","))
        except ValueError:
            raise ValueError(f"--change-link-devices {args.change_link_devices!r}: comma-separated device "
                             "indices, e.g. 0,1") from None
        change = LinkChange(args.change_link_at, Link(args.change_link_mbit, args.change_link_ms), devices)
    first = args.select[0]
    _, manifest = read_manifest(first / "export")
    config = run_config(first, manifest)
    images, labels = test_split(config["data"], args.data_dir)
    if args.limit is not None:
        images, labels = images[:args.limit], labels[:args.limit]
    options = DeployOptions(args.broker, args.ca_file, args.credentials_dir, link=Link(args.link_mbit, args.link_ms,
                                                                                        args.link_scope),
                            progress=args.progress, public_key=args.public_key)
    out_dir = args.out or first
    with sigterm_unwinds():
        run_select(args.select, out_dir, images, labels, args.deadline_ms, options, change)
    return (out_dir / "select_report.md").read_text()
