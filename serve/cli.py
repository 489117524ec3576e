"""``nonn serve device|aggregator|broker``: the runtime processes.

Importing this module costs nothing (argparse only): ``nonn serve ...`` never imports torch or the
training code, so a device needs numpy, onnxruntime and paho-mqtt alone.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from serve import defaults

SERVE_HELP = "run one runtime process: a device, the aggregator, or the broker"


def add_broker_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--broker", required=required, help="mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS")
    p.add_argument("--ca-file", default=None, help="CA certificate that signed the broker's (mqtts)")


def add_link_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--link-mbit", type=float, default=None, help="emulated uplink bandwidth, Mbit/s (sender side)")
    p.add_argument("--link-ms", type=float, default=None, help="emulated uplink latency, ms (sender side)")


def add_process_link_options(p: argparse.ArgumentParser) -> None:
    add_link_options(p)
    p.add_argument("--link-file", type=Path, default=None, help="a JSON file {mbit_per_s, latency_ms} re-read "
                   "when it changes: the emulated link changes while the process runs (absent: --link-mbit/-ms)")


def add_public_key_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--public-key", type=Path, default=None, help="an Ed25519 public key (PEM): refuse a bundle "
                   "whose manifest is not signed by it (nonn export --sign KEY)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``serve`` on the ``nonn`` parser."""
    serve = sub.add_parser("serve", help=SERVE_HELP, description=SERVE_HELP)
    roles = serve.add_subparsers(dest="role", required=True, metavar="ROLE")
    device = roles.add_parser("device", help="one device: its own model, input -> dev/<i>")
    device.add_argument("--bundle", type=Path, required=True, help="the export folder (only this device's "
                        "entry and model are read and checked)")
    device.add_argument("--index", type=int, required=True, help="which device of the bundle (0-based)")
    device.add_argument("--credentials", type=Path, required=True, help="this device's credential file")
    device.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    device.add_argument("--deadline-ms", type=float, default=defaults.DEADLINE_MS,
                        help="the aggregator's deadline; a staged device waits for each peer message a share of "
                        f"half of it (default {defaults.DEADLINE_MS:g})")
    add_broker_options(device)
    add_process_link_options(device)
    add_public_key_option(device)
    aggregator = roles.add_parser("aggregator", help="collect the K vectors of each request, publish the logits")
    aggregator.add_argument("--bundle", type=Path, required=True)
    aggregator.add_argument("--credentials", type=Path, required=True)
    aggregator.add_argument("--deadline-ms", type=float, default=defaults.DEADLINE_MS,
                            help=f"answer with the devices in by then (default {defaults.DEADLINE_MS:g})")
    aggregator.add_argument("--threads", type=int, default=1)
    add_broker_options(aggregator)
    add_process_link_options(aggregator)
    add_public_key_option(aggregator)
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


def run(args: argparse.Namespace) -> int:
    return guarded(_broker if args.role == "broker" else _serve, args)


def guarded(command: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a runtime command; its expected failures end as one line on stderr and an exit status."""
    # lazy, as every import in this file: paho and onnxruntime load only for the command that needs them
    from bundle.format import BundleError
    from serve.mqtt import RuntimeSetupError

    try:
        return command(args) or 0
    except (RuntimeSetupError, BundleError, ValueError, OSError) as e:
        print(f"nonn: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nonn: stopped by SIGINT", file=sys.stderr)
        return 130


def _serve(args: argparse.Namespace) -> None:
    from serve.mqtt import Broker, Link, LinkFile, read_credentials

    broker = Broker.parse(args.broker, args.ca_file)
    credentials = read_credentials(args.credentials)
    link = Link(args.link_mbit, args.link_ms)
    if args.link_file is not None:
        link = LinkFile(args.link_file, link)
    if args.role == "device":
        from serve.device import Device

        process = Device(args.bundle, args.index, broker, credentials, link, threads=args.threads,
                         public_key=args.public_key, deadline_ms=args.deadline_ms)
    else:
        from serve.aggregator import Aggregator

        process = Aggregator(args.bundle, broker, credentials, args.deadline_ms, link, threads=args.threads,
                             public_key=args.public_key)
    print(f"nonn serve {args.role}: {process.name} of bundle {process.bundle_id} on {broker.url}", flush=True)
    process.serve()


def _broker(args: argparse.Namespace) -> int:
    import os
    import shutil

    from bundle.format import read_manifest
    from serve.broker import Users, write_broker_files

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
