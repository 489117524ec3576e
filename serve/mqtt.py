"""MQTT plumbing shared by every runtime process: broker URLs, credentials, connecting, counting bytes.

Depends on the standard library and paho-mqtt only (devices import it).
"""
from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import paho.mqtt.client as mqtt

TOPIC_ROOT = "nonn"
CONNECT_TIMEOUT_S = 10.0


class RuntimeSetupError(RuntimeError):
    """The runtime cannot start: a bad broker URL, refused credentials, an unreachable broker."""


def topic(bundle_id: str, *parts: object) -> str:
    """``nonn/<bundle-id>/<parts...>``: every topic of one bundle lives under its id."""
    return "/".join([TOPIC_ROOT, bundle_id, *map(str, parts)])


@dataclass(frozen=True)
class Broker:
    host: str
    port: int
    tls: bool = False
    ca_file: str | None = None

    @classmethod
    def parse(cls, url: str, ca_file: str | None = None) -> Broker:
        """``mqtt://host:port`` or ``mqtts://host:port`` (TLS; ``ca_file`` verifies a private CA)."""
        parsed = urlparse(url)
        if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
            raise RuntimeSetupError(f"--broker {url!r}: expected mqtt://HOST:PORT or mqtts://HOST:PORT")
        try:
            port = parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)
        except ValueError as e:
            raise RuntimeSetupError(f"--broker {url!r}: {e}") from e
        return cls(parsed.hostname, port, parsed.scheme == "mqtts", ca_file)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def read_credentials(path: str | Path) -> tuple[str, str]:
    """(username, password) from a credential file written by ``serve.broker.write_broker_files``."""
    try:
        data = json.loads(Path(path).read_text())
        return str(data["username"]), str(data["password"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RuntimeSetupError(f"{path}: not a credential file ({e}); generate one with 'nonn deploy' "
                                "or serve.broker.write_broker_files") from e


class CountingClient(mqtt.Client):
    """A paho client that counts the bytes it writes to and reads from its socket: MQTT framing,
    payloads and keepalives as they go on the wire (TCP/IP headers excluded)."""

    bytes_sent = 0
    bytes_received = 0

    def _sock_send(self, buf: bytes) -> int:
        sent = super()._sock_send(buf)
        self.bytes_sent += sent
        return sent

    def _sock_recv(self, bufsize: int) -> bytes:
        data = super()._sock_recv(bufsize)
        self.bytes_received += len(data)
        return data


def connect(broker: Broker, credentials: tuple[str, str], client_id: str, *,
            will: tuple[str, bytes] | None = None) -> CountingClient:
    """A connected client (not yet looping); raises RuntimeSetupError with the broker's reason on refusal."""
    client = CountingClient(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    client.username_pw_set(*credentials)
    if broker.tls:
        client.tls_set(ca_certs=broker.ca_file)
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    result: dict[str, object] = {}
    done = threading.Event()

    def on_connect(_client, _userdata, _flags, reason, _properties) -> None:
        result["reason"] = reason
        done.set()

    client.on_connect = on_connect
    # small messages must not wait for Nagle's algorithm (40 ms with delayed ACKs on Linux)
    client.on_socket_open = lambda _c, _u, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        client.connect(broker.host, broker.port, keepalive=30)
    except OSError as e:
        raise RuntimeSetupError(f"cannot reach the broker at {broker.url} ({e}); is it running?") from e
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while not done.is_set() and time.monotonic() < deadline:
        client.loop(timeout=0.05)
    reason = result.get("reason")
    if reason is None or reason.is_failure:
        client.disconnect()
        why = "no answer" if reason is None else str(reason)
        raise RuntimeSetupError(f"the broker at {broker.url} refused {client_id!r} as user "
                                f"{credentials[0]!r}: {why}")
    client.on_connect = None
    return client


LINK_SCOPES = ("all", "devices")


class Link:
    """Emulated uplink applied by a sender: each message waits its serialisation time plus the latency.

    Labelled as emulated wherever it appears; ``None`` rates mean a real (unshaped) link. ``scope``
    says who sends through it: ``all`` (the image source, every device, the aggregator's answer) or
    ``devices`` (only the devices' uplinks; the source and the aggregator sit on unshaped links).
    """

    def __init__(self, mbit_per_s: float | None = None, latency_ms: float | None = None, scope: str = "all") -> None:
        if scope not in LINK_SCOPES:
            raise ValueError(f"--link-scope {scope!r}: choose one of {', '.join(LINK_SCOPES)}")
        for name, value in (("--link-mbit", mbit_per_s), ("--link-ms", latency_ms)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} {value:g}: must be above 0")
        self.mbit_per_s = mbit_per_s
        self.latency_ms = latency_ms
        self.scope = scope

    def for_role(self, role: str) -> Link:
        """The link a sender of this role uses: this one, or an unshaped one when out of scope."""
        return self if self.scope == "all" or role == "device" else Link()

    @property
    def emulated(self) -> bool:
        return bool(self.mbit_per_s or self.latency_ms)

    def delay_s(self, nbytes: int) -> float:
        seconds = (nbytes * 8 / (self.mbit_per_s * 1e6)) if self.mbit_per_s else 0.0
        return seconds + (self.latency_ms or 0.0) / 1000.0

    def send(self, client: mqtt.Client, topic_name: str, data: bytes) -> None:
        if self.emulated:
            time.sleep(self.delay_s(len(data)))
        client.publish(topic_name, data, qos=0)

    def describe(self) -> dict:
        return {"emulated": self.emulated, "mbit_per_s": self.mbit_per_s, "latency_ms": self.latency_ms,
                "scope": self.scope if self.emulated else None}


class LinkFile(Link):
    """An emulated link whose rate and latency a harness can change while the process runs, as ``tc``
    would change a real one: before each message the sender re-reads ``path`` when it changed
    (JSON ``{"mbit_per_s": x, "latency_ms": y}``, either null for none). While the file is absent the
    link is ``base``. A file that cannot be read leaves the link as it was, so a half-written one never
    stops a device (harnesses write it atomically anyway)."""

    def __init__(self, path: Path, base: Link) -> None:
        super().__init__(base.mbit_per_s, base.latency_ms)
        self.path, self.base = Path(path), base
        self._seen: int | None = None

    def _refresh(self) -> None:
        try:
            stamp = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            stamp = None
        if stamp == self._seen:
            return
        self._seen = stamp
        if stamp is None:
            self.mbit_per_s, self.latency_ms = self.base.mbit_per_s, self.base.latency_ms
            return
        try:
            spec = json.loads(self.path.read_text())
            changed = Link(spec.get("mbit_per_s"), spec.get("latency_ms"))
        except (OSError, ValueError, TypeError, AttributeError):
            return
        self.mbit_per_s, self.latency_ms = changed.mbit_per_s, changed.latency_ms

    def send(self, client: mqtt.Client, topic_name: str, data: bytes) -> None:
        self._refresh()
        super().send(client, topic_name, data)

    def describe(self) -> dict:
        self._refresh()
        return super().describe() | {"control_file": str(self.path)}
