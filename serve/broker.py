"""The Mosquitto side: one credential per runtime process, an ACL per role, and a broker launcher.

``write_broker_files`` writes, into one folder, ``mosquitto.conf`` (anonymous access off), the
password file (Mosquitto's PBKDF2-SHA512 ``$7$`` format), an ACL that lets each process publish only
its own topics, and ``credentials/<bundle-id>/<name>.json`` for every process and for the bundle's
source, the client that sends images (mode 0600). The broker takes each client's id from its user
name, so one session per credential: a second client with the same credential replaces the first,
and no credential can replace another's. Copy a process's credential file to its machine; the
broker's machine keeps the rest.
"""
from __future__ import annotations

import base64
import getpass
import hashlib
import json
import math
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bundle.format import exchanges, reads, writes
from serve import defaults
from serve.mqtt import RuntimeSetupError, topic
from serve.wire import HEADER

PBKDF2_ITERATIONS = 101  # Mosquitto's own default for $7$ hashes
SOURCE = "source"  # the client that publishes images and reads answers (``nonn deploy``, or yours)


def device_name(index: int) -> str:
    return f"device_{index}"


def password_hash(password: str, salt: bytes | None = None) -> str:
    """A Mosquitto 2 password-file hash: ``$7$<iterations>$<b64 salt>$<b64 PBKDF2-HMAC-SHA512>``."""
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


@dataclass(frozen=True)
class Users:
    """The processes of one bundle that the broker admits."""
    bundle_id: str
    num_devices: int
    reads: tuple[tuple[tuple, ...], ...]   # per device, the topics it reads (``bundle.format.reads``)
    writes: tuple[tuple[tuple, ...], ...]  # per device, the topics it publishes (``bundle.format.writes``)
    row_bytes: int = 0  # the largest row its messages carry (an image, a device's output or message, an answer), fp32

    @classmethod
    def of(cls, manifest: dict) -> Users:
        n = len(manifest["devices"])
        widths = [math.prod(manifest["input"]["shape"]), manifest["num_classes"],
                  *(d["output_width"] for d in manifest["devices"]),
                  *(e["channels"] * math.prod(d["stages"][s]["output_shape"][1:])
                    for s, e in exchanges(manifest).items() for d in manifest["devices"])]
        return cls(manifest["manifest_sha256"][:12], n, tuple(tuple(reads(manifest, i)) for i in range(n)),
                   tuple(tuple(writes(manifest, i)) for i in range(n)), 4 * max(widths))

    def message_bytes(self) -> int:
        """The largest message the runtime sends for this bundle: header + MAX_ROWS of its largest row."""
        return HEADER.size + defaults.MAX_ROWS * self.row_bytes

    def names(self) -> list[str]:
        """The runtime processes."""
        return [device_name(i) for i in range(self.num_devices)] + ["aggregator"]

    def accounts(self) -> list[str]:
        """Every credential of the bundle: its processes and its source."""
        return [*self.names(), SOURCE]

    def username(self, name: str) -> str:
        return f"{self.bundle_id}.{name}"

    def key(self, name: str) -> str:
        """How ``write_broker_files`` names an account's credential file: ``<bundle-id>/<name>``."""
        return f"{self.bundle_id}/{name}"

    def own(self, credentials: dict[str, Path]) -> dict[str, Path]:
        """This bundle's credential files, by account name, out of a broker's (several bundles may share one)."""
        return {name: credentials[self.key(name)] for name in self.accounts()}


def _acl(users: Users) -> list[str]:
    def t(*parts: object) -> str:
        return topic(users.bundle_id, *parts)

    def rules(name: str, read: list[str], write: list[str]) -> str:
        lines = [f"user {users.username(name)}", *(f"topic read {x}" for x in read),
                 *(f"topic write {x}" for x in write)]
        return "\n".join(lines)

    blocks = [rules(device_name(i), [*(t(*x) for x in users.reads[i]), t("control")],
                    [*(t(*x) for x in users.writes[i]), t("status", device_name(i)), t("stats", device_name(i))])
              for i in range(users.num_devices)]
    blocks.append(rules("aggregator", [t("input"), t("dev", "+"), t("control")],
                        [t("out"), t("status", "aggregator"), t("stats", "aggregator")]))
    blocks.append(rules(SOURCE, [t("out"), t("status", "#"), t("stats", "#")], [t("input"), t("control")]))
    return blocks


def write_broker_files(folder: str | Path, bundles: Sequence[Users], port: int, bind: str = "127.0.0.1",
                       tls: dict | None = None) -> dict[str, Path]:
    """Write the broker's config, password file and ACL and one credential file per process.

    Several bundles can share one broker (each under its own topics). ``tls`` (optional):
    ``{"certfile": ..., "keyfile": ..., "cafile": ...}`` for an mqtts listener. Returns
    ``"<bundle-id>/<account>"`` -> credential file, for every process and each bundle's source.
    """
    folder = Path(folder).resolve()
    credentials, lines, acl = {}, [], []
    accounts = [(u.key(name), u.username(name)) for u in bundles for name in u.accounts()]
    for key, username in accounts:
        password = secrets.token_urlsafe(18)
        path = folder / "credentials" / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(path, json.dumps({"username": username, "password": password}) + "\n")
        credentials[key] = path
        lines.append(f"{username}:{password_hash(password)}")
    for u in bundles:
        acl += _acl(u)
    _write_private(folder / "passwd", "\n".join(lines) + "\n")
    _write_private(folder / "acl", "\n\n".join(acl) + "\n")
    ids = ", ".join(u.bundle_id for u in bundles)
    conf = [f"# NoNN runtime broker for bundle(s) {ids}: anonymous access off, one user per process",
            f"user {getpass.getuser()}", "per_listener_settings false", "allow_anonymous false",
            f"password_file {folder / 'passwd'}", f"acl_file {folder / 'acl'}", "persistence false",
            "max_queued_messages 100000", "set_tcp_nodelay true",
            # larger payloads are refused by the broker, never queued: the runtime sends nothing bigger
            f"message_size_limit {max(u.message_bytes() for u in bundles)}", "log_type error", "log_type warning",
            f"listener {port} {bind}",
            # a client's id is its user name, so no credential can take over (kick) another's session; a
            # listener setting in Mosquitto 2 even with per_listener_settings false, so it follows the listener
            "use_username_as_clientid true"]
    for key, value in (tls or {}).items():
        conf.append(f"{key} {Path(value).resolve()}")
    _write_private(folder / "mosquitto.conf", "\n".join(conf) + "\n")
    return credentials


def _write_private(path: Path, text: str) -> None:
    """Owner-only file, written whole (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_broker(folder: str | Path, port: int, host: str = "127.0.0.1", timeout_s: float = 10.0) -> subprocess.Popen:
    """Run ``mosquitto -c folder/mosquitto.conf`` and wait until it accepts connections on ``port``."""
    exe = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None)
    if exe is None:
        raise RuntimeSetupError("mosquitto is not installed; run ./setup.sh (or 'apt-get install mosquitto'), "
                                "or pass --broker URL of a running broker")
    log = open(Path(folder) / "mosquitto.log", "wb")
    process = subprocess.Popen([exe, "-c", str(Path(folder) / "mosquitto.conf")], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = (Path(folder) / "mosquitto.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise RuntimeSetupError(f"mosquitto exited with code {process.returncode}: {' '.join(tail)}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeSetupError(f"mosquitto did not listen on {host}:{port} within {timeout_s:.0f} s")


