"""What every runtime process shares: its MQTT session, its status and stats topics, its counters.

A process announces ``ready`` on ``status/<name>``, retained (the broker publishes a retained
``offline`` for it if it dies, so a client that subscribes later still learns who is up), answers
``stats`` on the ``control`` topic with its counters as JSON, and counts every message it drops by
reason instead of raising. Its network loop runs in paho's thread, which reconnects after a broker
restart, a network blip or a kick (with backoff); each reconnect restores the subscriptions and the
``ready`` status, and is logged and counted.
"""
from __future__ import annotations

import collections
import json
import signal
import sys
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt

from serve.mqtt import Broker, Link, connect, topic
from serve.wire import WireError

STATS_REQUEST = b"stats"
RECONNECT_DELAY_S = (0.2, 5.0)  # backoff between reconnect attempts: first, longest


class Endpoint:
    def __init__(self, name: str, bundle_id: str, broker: Broker, credentials: tuple[str, str],
                 link: Link | None = None) -> None:
        self.name = name
        self.bundle_id = bundle_id
        self.link = link or Link()
        self.dropped: collections.Counter[str] = collections.Counter()
        self.received = 0
        self.sent_messages = 0
        self.sent_payload_bytes = 0
        self.compute_s = 0.0
        self.computed = 0
        self.stop = threading.Event()
        self.subscriptions: list[str] = []
        self.announced = False
        self.reconnects = 0
        self.client = connect(broker, credentials, f"nonn-{bundle_id}-{name}",
                              will=(topic(bundle_id, "status", name), b"offline"))
        self.client.reconnect_delay_set(*RECONNECT_DELAY_S)
        self.client.on_connect = self._reconnected
        self.client.on_disconnect = self._disconnected
        self.on(topic(bundle_id, "control"), self._control)

    def on(self, topic_filter: str, handler: Callable[[bytes], None]) -> None:
        """Subscribe ``handler`` to ``topic_filter``; whatever it raises is counted, never propagated."""
        def callback(_client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
            self.received += 1
            try:
                handler(message.payload)
            except WireError as e:
                self.dropped[str(e)] += 1
            except Exception as e:  # noqa: BLE001 - a message must never take the process down
                self.dropped[type(e).__name__] += 1

        self.client.message_callback_add(topic_filter, callback)
        self.client.subscribe(topic_filter, qos=0)
        self.subscriptions.append(topic_filter)

    def _reconnected(self, client: mqtt.Client, _userdata: object, _flags: object, reason: object,
                     _properties: object) -> None:
        """paho's loop connected again: the broker forgot this session, so subscribe and announce anew."""
        if reason.is_failure:
            self.log(f"reconnect refused by the broker: {reason}")
            return
        self.reconnects += 1
        for topic_filter in self.subscriptions:
            client.subscribe(topic_filter, qos=0)
        if self.announced:
            self.announce()
        self.log(f"reconnected ({self.reconnects}); {len(self.subscriptions)} subscriptions restored")

    def _disconnected(self, _client: mqtt.Client, _userdata: object, _flags: object, reason: object,
                      _properties: object) -> None:
        if not self.stop.is_set():
            self.log(f"lost the broker ({reason}); reconnecting")

    def log(self, message: str) -> None:
        print(f"[{self.name}] {message}", file=sys.stderr, flush=True)

    def publish(self, topic_name: str, data: bytes, payload_bytes: int) -> None:
        self.link.send(self.client, topic_name, data)
        self.sent_messages += 1
        self.sent_payload_bytes += payload_bytes

    def announce(self) -> None:
        self.announced = True
        self.client.publish(topic(self.bundle_id, "status", self.name), b"ready", qos=1, retain=True)

    def stats(self) -> dict:
        return {"name": self.name, "received": self.received, "dropped": dict(self.dropped),
                "sent_messages": self.sent_messages, "sent_payload_bytes": self.sent_payload_bytes,
                "socket_bytes_sent": self.client.bytes_sent, "socket_bytes_received": self.client.bytes_received,
                "computed": self.computed, "reconnects": self.reconnects,
                "compute_s": self.compute_s, "link": self.link.describe(), "time": time.time()}

    def _control(self, data: bytes) -> None:
        if data == STATS_REQUEST:
            self.client.publish(topic(self.bundle_id, "stats", self.name), json.dumps(self.stats()).encode(), qos=1)
        else:
            self.dropped["control"] += 1

    def handle_signals(self) -> None:
        """SIGTERM/SIGINT end the process cleanly: the loop stops and the client disconnects."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())

    def close(self) -> None:
        self.client.publish(topic(self.bundle_id, "status", self.name), b"offline", qos=1, retain=True)
        self.client.disconnect()
