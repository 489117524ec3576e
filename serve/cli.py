"""``nonn serve device|aggregator|broker`` and ``nonn deploy``.

Importing this module costs nothing (argparse only): ``nonn serve ...`` never imports torch or the
training code, so a device needs numpy, onnxruntime and paho-mqtt alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

SERVE_HELP = "run one runtime process: a device, the aggregator, or the broker"
DEPLOY_HELP = "broker + K device processes + aggregator; stream the test split, fault drill, deploy_report"
DEFAULT_DEADLINE_MS = 50.0


def _add_broker_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--broker", required=required, help="mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS")
    p.add_argument("--ca-file", default=None, help="CA certificate that signed the broker's (mqtts)")


def _add_link_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--link-mbit", type=float, default=None, help="emulated uplink bandwidth, Mbit/s (sender side)")
    p.add_argument("--link-ms", type=float, default=None, help="emulated uplink latency, ms (sender side)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``serve`` and ``deploy`` on the ``nonn`` parser."""
    serve = sub.add_parser("serve", help=SERVE_HELP, description=SERVE_HELP)
    roles = serve.add_subparsers(dest="role", required=True, metavar="ROLE")
    device = roles.add_parser("device", help="one device: its own model, input -> dev/<i>")
    device.add_argument("--bundle", type=Path, required=True, help="the export folder (only this device's "
                        "entry and model are read and checked)")
    device.add_argument("--index", type=int, required=True, help="which device of the bundle (0-based)")
    device.add_argument("--credentials", type=Path, required=True, help="this device's credential file")
    device.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    _add_broker_options(device)
    _add_link_options(device)
    aggregator = roles.add_parser("aggregator", help="collect the K vectors of each request, publish the logits")
    aggregator.add_argument("--bundle", type=Path, required=True)
    aggregator.add_argument("--credentials", type=Path, required=True)
    aggregator.add_argument("--deadline-ms", type=float, default=DEFAULT_DEADLINE_MS,
                            help=f"answer with the devices in by then (default {DEFAULT_DEADLINE_MS:g})")
    aggregator.add_argument("--threads", type=int, default=1)
    _add_broker_options(aggregator)
    _add_link_options(aggregator)
    broker = roles.add_parser("broker", help="write the broker's config, password file, ACL and one credential "
                              "per process, then run mosquitto")
    broker.add_argument("--bundle", type=Path, required=True, action="append",
                        help="an export folder; repeat to serve several bundles from one broker")
    broker.add_argument("--out", type=Path, required=True, help="folder for mosquitto.conf, passwd, acl, credentials/")
    broker.add_argument("--port", type=int, default=1883)
    broker.add_argument("--bind", default="0.0.0.0", help="listen address (default: all interfaces)")
    broker.add_argument("--tls-cert", default=None, help="server certificate (enables TLS on the listener)")
    broker.add_argument("--tls-key", default=None)
    broker.add_argument("--tls-ca", default=None)
    broker.add_argument("--write-only", action="store_true", help="write the files, do not start mosquitto")

    deploy = sub.add_parser("deploy", help=DEPLOY_HELP, description=DEPLOY_HELP)
    where = deploy.add_mutually_exclusive_group(required=True)
    where.add_argument("--run-dir", type=Path, help="a finished run: its export/ and report.json")
    where.add_argument("--bundle", type=Path, help="an export folder")
    deploy.add_argument("--out", type=Path, default=None,
                        help="where deploy_report.json/.md go (default: the run folder, or next to the bundle)")
    _add_broker_options(deploy, required=False)
    deploy.add_argument("--credentials-dir", type=Path, default=None,
                        help="with --broker: the credentials/ folder 'nonn serve broker' wrote for that broker")
    deploy.add_argument("--limit", type=int, default=None, help="stream only the first N test images")
    deploy.add_argument("--external", action="store_true", help="with --broker: the device and aggregator "
                        "processes already run elsewhere; wait for them instead of starting them (no fault drill)")
    # None: the run's config (deploy section), else the built-in default
    deploy.add_argument("--deadline-ms", type=float, default=None, help="default: deploy.deadline_ms (50)")
    deploy.add_argument("--window", type=int, default=None, help="requests in flight in the throughput phase "
                        "(default: deploy.window, 8)")
    deploy.add_argument("--drill-images", type=int, default=None, help="images streamed in the fault drill, 0: "
                        "none (default: deploy.drill_images, 600)")
    deploy.add_argument("--drill-device", type=int, default=None, help="the device the drill kills "
                        "(default: deploy.drill_device, 0)")
    deploy.add_argument("--data-dir", default=None, help="dataset folder (default: the run's data.data_dir)")
    deploy.add_argument("--mp", action="store_true", help="also measure the run's model-parallel baseline "
                        "(export_mp/: the teacher cut layer-wise) through the same broker, side by side")
    deploy.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    _add_link_options(deploy)
    deploy.add_argument("--link-scope", choices=("all", "devices"), default="all",
                        help="who sends through the emulated links: every sender (default) or only the devices")


def run(args: argparse.Namespace) -> int:
    from serve.mqtt import RuntimeSetupError
    from students.bundle import BundleError

    try:
        if args.command == "deploy":
            from serve.deploy import deploy_from_args

            print(deploy_from_args(args))
        elif args.role == "broker":
            return _broker(args)
        else:
            _serve(args)
    except (RuntimeSetupError, BundleError, ValueError, OSError) as e:
        print(f"nonn: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nonn: stopped by SIGINT", file=sys.stderr)
        return 130
    return 0


def _serve(args: argparse.Namespace) -> None:
    from serve.mqtt import Broker, Link, read_credentials

    broker = Broker.parse(args.broker, args.ca_file)
    credentials = read_credentials(args.credentials)
    link = Link(args.link_mbit, args.link_ms)
    if args.role == "device":
        from serve.device import Device

        process = Device(args.bundle, args.index, broker, credentials, link, threads=args.threads)
    else:
        from serve.aggregator import Aggregator

        process = Aggregator(args.bundle, broker, credentials, args.deadline_ms, link, threads=args.threads)
    print(f"nonn serve {args.role}: {process.name} of bundle {process.bundle_id} on {broker.url}", flush=True)
    process.serve()


def _broker(args: argparse.Namespace) -> int:
    import os
    import shutil

    from serve.broker import Users, write_broker_files
    from students.bundle import read_manifest

    users = [Users.of(read_manifest(path)[1]) for path in args.bundle]
    tls = {k: v for k, v in (("certfile", args.tls_cert), ("keyfile", args.tls_key), ("cafile", args.tls_ca)) if v}
    if tls and not {"certfile", "keyfile"} <= set(tls):
        raise ValueError("--tls-cert and --tls-key go together")
    credentials = write_broker_files(args.out, users, args.port, args.bind, tls)
    print(f"broker files in {args.out}; give each process its credential file:")
    for name, path in credentials.items():
        print(f"  {name:<26} {path}")
    if args.write_only:
        return 0
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    os.execv(exe, [exe, "-c", str(Path(args.out).resolve() / "mosquitto.conf")])
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    """``python -m serve``: the runtime commands on their own (what a device machine runs)."""
    parser = argparse.ArgumentParser(prog="nonn")
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run(parser.parse_args(argv))
