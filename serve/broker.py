"""The Mosquitto side: one credential per runtime process, an ACL per role, and a broker launcher.

``write_broker_files`` writes, into one folder, ``mosquitto.conf`` (anonymous access off), the
password file (Mosquitto's PBKDF2-SHA512 ``$7$`` format), an ACL that lets each process publish only
its own topics, and ``credentials/<name>.json`` for every process (mode 0600). Copy a process's
credential file to its machine; the broker's machine keeps the rest.
"""
from __future__ import annotations

import base64
import getpass
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

from serve.mqtt import Broker, RuntimeSetupError, topic

PBKDF2_ITERATIONS = 101  # Mosquitto's own default for $7$ hashes
SOURCE = "source"  # the client that publishes images and reads answers (``nonn deploy``, or yours)


def device_name(index: int) -> str:
    return f"device_{index}"


def password_hash(password: str, salt: bytes | None = None) -> str:
    """A Mosquitto 2 password-file hash: ``$7$<iterations>$<b64 salt>$<b64 PBKDF2-HMAC-SHA512>``."""
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _acl(bundle_id: str, num_devices: int) -> str:
    def rules(user: str, read: list[str], write: list[str]) -> str:
        lines = [f"user {user}", *(f"topic read {t}" for t in read), *(f"topic write {t}" for t in write)]
        return "\n".join(lines)

    def t(*parts: object) -> str:
        return topic(bundle_id, *parts)

    blocks = [rules(device_name(i), [t("input"), t("control")],
                    [t("dev", i), t("status", device_name(i)), t("stats", device_name(i))]) for i in range(num_devices)]
    blocks.append(rules("aggregator", [t("input"), t("dev", "+"), t("control")],
                        [t("out"), t("status", "aggregator"), t("stats", "aggregator")]))
    blocks.append(rules(SOURCE, [t("out"), t("status", "#"), t("stats", "#")], [t("input"), t("control")]))
    return "\n\n".join(blocks) + "\n"


def write_broker_files(folder: str | Path, bundle_id: str, num_devices: int, port: int,
                       bind: str = "127.0.0.1", tls: dict | None = None) -> dict[str, Path]:
    """Write the broker's config, password file and ACL and one credential file per process.

    ``tls`` (optional): ``{"certfile": ..., "keyfile": ..., "cafile": ...}`` for an mqtts listener.
    Returns process name -> credential file.
    """
    folder = Path(folder).resolve()
    (folder / "credentials").mkdir(parents=True, exist_ok=True)
    names = [device_name(i) for i in range(num_devices)] + ["aggregator", SOURCE]
    credentials, lines = {}, []
    for name in names:
        password = secrets.token_urlsafe(18)
        path = folder / "credentials" / f"{name}.json"
        _write_private(path, json.dumps({"username": name, "password": password}) + "\n")
        credentials[name] = path
        lines.append(f"{name}:{password_hash(password)}")
    _write_private(folder / "passwd", "\n".join(lines) + "\n")
    _write_private(folder / "acl", _acl(bundle_id, num_devices))
    conf = [f"# NoNN runtime broker for bundle {bundle_id}: anonymous access off, one user per process",
            f"user {getpass.getuser()}", "per_listener_settings false", "allow_anonymous false",
            f"password_file {folder / 'passwd'}", f"acl_file {folder / 'acl'}", "persistence false",
            "max_queued_messages 100000", "set_tcp_nodelay true", "log_type error", "log_type warning", f"listener {port} {bind}"]
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


def local_broker(port: int) -> Broker:
    return Broker("127.0.0.1", port)
