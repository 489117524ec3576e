"""The deployment runtime: real Mosquitto on loopback, every device and the aggregator a real process.

Covers the wire format under fuzzing, ``nonn deploy`` end to end with its fault drill, a device and
aggregator running with torch made unimportable, fuzzed / foreign / forbidden messages, and
rejected credentials.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import torch
import yaml

from bundle.export import ExportFormat, export_bundle
from bundle.format import Bundle, exchange_message, model_images, read_manifest, run_model
from pipeline.deploy import run_deploy
from pipeline.deploy_phases import DeployOptions, stream_sequential
from pipeline.fleet import HEALTH_CHECK_S, Fleet, Source
from serve import wire
from serve.broker import SOURCE, Users, free_port, password_hash, start_broker, write_broker_files
from serve.mqtt import Broker, Link, LinkFile, RuntimeSetupError, connect, read_credentials, topic
from tests.conftest import TINY
from tests.helpers import CLASSES, DEVICE_ENTRIES, IMAGE_SHAPE, WIDTHS, images, tiny_student

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
                                reason="mosquitto is not installed (setup.sh installs it)")]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)
    model = tiny_student()
    root = tmp_path_factory.mktemp("serve")
    out = {}
    for transport in ("fp32", "int8"):
        out[transport] = root / transport / "export"
        export_bundle(model, out[transport], image_shape=IMAGE_SHAPE, class_names=CLASSES, device_entries=DEVICE_ENTRIES,
                      calibration_images=images(32, seed=1), form=ExportFormat(transport=transport))
    return out


@pytest.fixture(scope="module")
def bundle(bundles: dict[str, Path]) -> Path:
    return bundles["fp32"]


@pytest.fixture(scope="module")
def test_images() -> tuple[np.ndarray, np.ndarray]:
    pixels = (images(240, seed=5).numpy() * 255).round().astype(np.uint8)
    return pixels, np.random.default_rng(0).integers(0, len(CLASSES), len(pixels))


@pytest.fixture(scope="module")
def broker(bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    """A broker for the fp32 bundle: (Broker, name -> credential file, bundle id)."""
    users = Users.of(read_manifest(bundle)[1])
    folder = tmp_path_factory.mktemp("broker")
    port = free_port()
    files = write_broker_files(folder, [users], port)
    credentials = users.own(files)
    credentials["rogue"] = _add_rogue_account(folder, users)
    process = start_broker(folder, port)
    yield Broker("127.0.0.1", port), credentials, users.bundle_id
    process.terminate()
    process.wait(timeout=10)


def _add_rogue_account(folder: Path, users: Users) -> Path:
    """A second credential with device_0's rights, as a compromised device_0 would have: it may publish on
    dev/0 beside the real device_0 (one session per credential, so the real device's own would replace it)."""
    password = "rogue-password"
    acl = (folder / "acl").read_text()
    block = next(b for b in acl.split("\n\n") if b.startswith(f"user {users.username('device_0')}\n"))
    (folder / "acl").write_text(acl + "\n" + block.replace(users.username("device_0"), "rogue", 1) + "\n")
    with open(folder / "passwd", "a") as f:
        f.write(f"rogue:{password_hash(password)}\n")
    path = folder / "credentials" / "rogue.json"
    path.write_text(json.dumps({"username": "rogue", "password": password}))
    return path


@pytest.fixture
def fleet(bundle: Path, broker, tmp_path: Path):
    yield from _stopped_after(bundle, broker, tmp_path, 50.0)


def _stopped_after(bundle: Path, broker, tmp_path: Path, deadline_ms: float):
    """A fleet for the bundle behind ``broker`` at ``deadline_ms``, stopped when the test ends."""
    server, credentials, _ = broker
    running = Fleet(bundle.resolve(), server, credentials, deadline_ms, Link(), tmp_path)
    yield running
    running.stop()


def _source(broker, bundle_id: str) -> Source:
    server, credentials, _ = broker
    return Source(server, read_credentials(credentials[SOURCE]), bundle_id, len(CLASSES), Link())


# --- the wire format ---------------------------------------------------------------------------------

def test_wire_roundtrip_and_every_corruption_is_a_wire_error():
    key = wire.bundle_key("0123456789ab")
    vector = np.arange(10, dtype=np.float32).reshape(2, 5)
    data = wire.encode(wire.KIND_DEVICE, key, 7, vector, device=1, scale=0.5)
    message = wire.decode(data, key, wire.KIND_DEVICE, (5,), (np.dtype("float32"),))
    assert (message.request, message.device, message.scale) == (7, 1, 0.5)
    np.testing.assert_array_equal(message.payload, vector)
    expect = {data[:-1]: "malformed", data + b"\0": "malformed", data[:10]: "short", b"": "short",
              b"XoNN" + data[4:]: "malformed"}
    for bad, reason in expect.items():
        with pytest.raises(wire.WireError, match=reason):
            wire.decode(bad, key, wire.KIND_DEVICE, (5,), (np.dtype("float32"),))
    with pytest.raises(wire.WireError, match="foreign"):
        wire.decode(data, wire.bundle_key("ffffffffffff"), wire.KIND_DEVICE, (5,), (np.dtype("float32"),))
    with pytest.raises(wire.WireError, match="malformed"):  # right bytes, wrong kind / width / dtype
        wire.decode(data, key, wire.KIND_INPUT, (5,), (np.dtype("float32"),))
    with pytest.raises(wire.WireError, match="malformed"):
        wire.decode(data, key, wire.KIND_DEVICE, (4,), (np.dtype("float32"),))
    with pytest.raises(wire.WireError, match="malformed"):
        wire.decode(data, key, wire.KIND_DEVICE, (5,), (np.dtype("uint8"),))


def test_random_bytes_only_ever_raise_wire_errors():
    rng = np.random.default_rng(0)
    key = wire.bundle_key("0123456789ab")
    valid = wire.encode(wire.KIND_INPUT, key, 1, np.zeros((1, 1, 4, 4), np.uint8))
    for i in range(3000):
        if i % 2:  # random tails behind a plausible header exercise the checks past the magic
            data = valid[:int(rng.integers(0, len(valid)))] + rng.bytes(int(rng.integers(0, 40)))
        else:
            data = rng.bytes(int(rng.integers(0, 80)))
        try:
            wire.decode(data, key, wire.KIND_INPUT, (1, 4, 4), (np.dtype("uint8"), np.dtype("float32")))
        except wire.WireError:
            pass


def test_link_emulation_scope_and_delay():
    link = Link(mbit_per_s=1.0, latency_ms=10.0, scope="devices")
    assert link.delay_s(1250) == pytest.approx(0.01 + 0.01)  # 10,000 bits at 1 Mbit/s, then 10 ms
    assert link.for_role("device") is link and not link.for_role("source").emulated
    assert not link.for_role("aggregator").emulated and Link(1.0, None).for_role("source").emulated
    with pytest.raises(ValueError, match="--link-scope 'some'"):
        Link(1.0, 1.0, scope="some")
    with pytest.raises(ValueError, match="--link-mbit 0: must be above 0"):
        Link(0.0, 1.0)


def test_link_file_changes_the_link_while_the_process_runs(tmp_path):
    """Absent: the base link; written: its rate and latency; a file that cannot be read (or sets a rate of
    0) leaves the link as it was; removed: the base link again."""
    path = tmp_path / "device_0.json"
    link = LinkFile(path, Link(None, 2.0))
    link._refresh()
    assert link.delay_s(1250) == pytest.approx(0.002)
    path.write_text('{"mbit_per_s": 1.0, "latency_ms": null}')
    link._refresh()
    assert link.delay_s(1250) == pytest.approx(0.01) and link.describe()["control_file"] == str(path)
    for bad in ("{not json", '{"mbit_per_s": 0}'):
        path.write_text(bad)
        os.utime(path, ns=(time.time_ns(), time.time_ns() + len(bad)))  # a new mtime even on a coarse clock
        link._refresh()
        assert link.delay_s(1250) == pytest.approx(0.01)
    path.unlink()
    link._refresh()
    assert link.delay_s(1250) == pytest.approx(0.002)


# --- end to end ----------------------------------------------------------------------------------------

def test_deploy_end_to_end_with_fault_drill(bundle: Path, test_images, tmp_path: Path):
    pixels, labels = test_images
    # a deadline long enough that a loaded CI machine answers every request with both devices in
    report = run_deploy(bundle, tmp_path, pixels, labels,
                        DeployOptions(drill_images=150, drill_device=1, deadline_ms=1000, progress=False))
    expected = Bundle.load(bundle, threads=1).predict_batches(pixels).argmax(1)
    assert report["accuracy"]["predictions_equal_bundle"] and report["accuracy"]["pipelined_predictions_equal_bundle"]
    assert report["accuracy"]["over_the_wire"] == pytest.approx(float((expected == labels).mean()))
    assert report["lost"]["total"] == 0 and report["requests"] == 2 * len(pixels) + 151
    # bytes are counted at each client's socket: the payload exactly, MQTT framing and our header on top
    per = report["per_inference"]
    assert per["device_0"]["payload_bytes"] == WIDTHS[0] * 4 and per["device_1"]["payload_bytes"] == WIDTHS[1] * 4
    assert per["source"]["payload_bytes"] == int(np.prod(IMAGE_SHAPE))
    for name in ("device_0", "device_1", "aggregator", "source"):
        assert per[name]["wire_bytes"] >= per[name]["payload_bytes"] + wire.HEADER.size
    assert per["device_0"]["compute_ms"] > 0
    drill = report["drill"]
    assert report["throughput"]["answered_with_devices_missing"] == 0
    assert drill["lost"] == 0 and drill["answered_without_device"] >= 150 // 3 - 1
    assert drill["predictions_equal_bundle_missing_device"] and drill["predictions_equal_bundle_whole"]
    assert drill["answered_whole_after_rejoin"] and drill["rejoined_after_restart_ms"] is not None
    assert drill["other_flags"] == 0
    saved = json.loads((tmp_path / "deploy_report.json").read_text())
    assert saved["lost"] == report["lost"] and "Fault drill" in (tmp_path / "deploy_report.md").read_text()


def test_int8_transport_over_the_wire_equals_the_bundle(bundles, test_images, tmp_path: Path):
    pixels, labels = test_images
    report = run_deploy(bundles["int8"], tmp_path, pixels[:60], labels[:60], DeployOptions(drill_images=0, progress=False))
    assert report["accuracy"]["predictions_equal_bundle"] and report["lost"]["total"] == 0
    assert report["per_inference"]["device_1"]["payload_bytes"] == WIDTHS[1]  # one byte per number


# --- processes -----------------------------------------------------------------------------------------

NO_TORCH = """
import atexit, json, sys
for name in ("torch", "pytorch_lightning", "lightning", "torchmetrics"):
    sys.modules[name] = None  # any import of these now raises ImportError
atexit.register(lambda: open(sys.argv[1], "w").write(json.dumps(sorted(k for k, v in sys.modules.items() if v))))
from pipeline.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_device_and_aggregator_run_with_torch_unimportable(bundle: Path, broker, tmp_path: Path):
    server, credentials, bundle_id = broker
    common = ["--bundle", str(bundle), "--broker", server.url]
    roles = {"device_0": ["device", "--index", "0"], "device_1": ["device", "--index", "1"],
             "aggregator": ["aggregator", "--deadline-ms", "5000"]}
    source = _source(broker, bundle_id)
    started = time.perf_counter()
    processes = {name: subprocess.Popen([sys.executable, "-c", NO_TORCH, str(tmp_path / f"{name}.json"), "serve",
                                         *args, *common, "--credentials", str(credentials[name])],
                                        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for name, args in roles.items()}
    try:
        source.wait_ready(list(roles), started)
        pixels = (images(4, seed=3).numpy() * 255).astype(np.uint8)
        answers = [source.wait(source.send(pixels[i:i + 1]), 10.0) for i in range(4)]
    finally:
        source.close()
        for p in processes.values():
            p.terminate()
    outputs = {name: p.communicate(timeout=10)[0] for name, p in processes.items()}
    assert all(p.returncode == 0 for p in processes.values()), outputs
    expected = Bundle.load(bundle, threads=1).predict(pixels)
    for i, answer in enumerate(answers):
        assert answer is not None and answer.flags == 0
        np.testing.assert_allclose(answer.logits[0], expected[i], rtol=1e-5, atol=1e-5)
    for name in roles:
        modules = json.loads((tmp_path / f"{name}.json").read_text())
        assert not [m for m in modules if m.split(".")[0] in ("torch", "pytorch_lightning", "onnx")]
        ours = {m for m in modules if m.split(".")[0] in ("core", "students", "imagedata", "bundle", "partitioning",
                                                          "distill", "methods", "serve", "pipeline")}
        assert ours <= {"pipeline", "pipeline.cli", "bundle", "bundle.format", "serve", "serve.cli", "serve.defaults",
                        "serve.mqtt", "serve.wire", "serve.endpoint", "serve.device", "serve.aggregator"}, ours


NAMES = ["device_0", "device_1", "aggregator"]


def _fleet_and_rogue(broker, fleet: Fleet) -> tuple[Source, mqtt.Client]:
    """The fleet's processes started and ready, a source, and a second client holding device_0's credential."""
    server, credentials, bundle_id = broker
    source = _source(broker, bundle_id)
    started = time.perf_counter()
    for name in NAMES:
        fleet.start(name)
    rogue = connect(server, read_credentials(credentials["rogue"]), "rogue-device_0")
    source.wait_ready(NAMES, started)
    return source, rogue


def _watched_source(broker, fleet: Fleet) -> Source:
    """The fleet's processes started and ready, and a source that checks their health while it waits (as
    deploy's does)."""
    source, rogue = _fleet_and_rogue(broker, fleet)
    rogue.disconnect()
    source.health = fleet.check_alive
    return source


def _stats_once_aggregator_dropped(source: Source, reason: str, count: int, timeout_s: float = 10.0) -> dict:
    """Every process's stats, once the aggregator has dropped ``count`` messages for ``reason``."""
    deadline = time.monotonic() + timeout_s
    while (stats := source.collect_stats(NAMES))["aggregator"]["dropped"].get(reason, 0) < count:
        assert time.monotonic() < deadline, stats["aggregator"]["dropped"]
        time.sleep(0.1)
    return stats


def test_fuzzed_foreign_and_forbidden_messages_are_dropped_and_counted(bundle: Path, broker, fleet: Fleet):
    bundle_id = broker[2]
    source, rogue = _fleet_and_rogue(broker, fleet)
    try:
        rng = np.random.default_rng(1)
        key = wire.bundle_key(bundle_id)
        pixel = (images(1, seed=4).numpy() * 255).astype(np.uint8)
        for _ in range(50):
            source.client.publish(topic(bundle_id, "input"), rng.bytes(int(rng.integers(0, 400))))
            rogue.publish(topic(bundle_id, "dev", 0), rng.bytes(int(rng.integers(0, 100))))
        source.client.publish(topic(bundle_id, "input"),
                              wire.encode(wire.KIND_INPUT, wire.bundle_key("ffffffffffff"), 1, pixel))
        source.client.publish(topic(bundle_id, "input"),
                              wire.encode(wire.KIND_INPUT, key, 2, np.full((1, *IMAGE_SHAPE), np.nan, np.float32)))
        rogue.publish(topic(bundle_id, "dev", 0), wire.encode(wire.KIND_DEVICE, key, 3, np.zeros((1, 99), np.float32)))
        # the ACL lets device_0 publish only its own topics: a forged answer never reaches the source
        forged = source.next_request + 1000
        source.sent_at[forged] = time.perf_counter()
        rogue.publish(topic(bundle_id, "out"),
                      wire.encode(wire.KIND_OUTPUT, key, forged, np.zeros((1, len(CLASSES)), np.float32)))
        rogue.loop(timeout=0.5)
        request = source.send(pixel)
        answer = source.wait(request, 10.0)
        # a vector for a request already answered is late: dropped and counted
        rogue.publish(topic(bundle_id, "dev", 0),
                      wire.encode(wire.KIND_DEVICE, key, request, np.zeros((1, WIDTHS[0]), np.float32)))
        rogue.loop(timeout=0.5)
        stats = _stats_once_aggregator_dropped(source, "late", 1)
        fleet.check_alive()
    finally:
        source.close()
        rogue.disconnect()
    assert answer is not None and answer.flags == 0
    np.testing.assert_allclose(answer.logits[0], Bundle.load(bundle, threads=1).predict(pixel)[0], atol=1e-5)
    assert forged not in source.answers
    dropped_0 = stats["device_0"]["dropped"]
    assert dropped_0.get("foreign") == 1 and dropped_0.get("bad_input") == 1
    assert sum(dropped_0.values()) == 52  # 50 random + foreign + NaN image
    dropped_agg = stats["aggregator"]["dropped"]
    assert dropped_agg.get("foreign") == 1 and dropped_agg.get("bad_input") == 1 and dropped_agg.get("late") == 1
    assert sum(dropped_agg.values()) == 50 + 50 + 4  # random inputs and vectors, foreign, NaN, bad width, late


def test_the_sender_is_the_topic_not_the_header_and_vectors_open_no_request(bundle: Path, broker, fleet: Fleet):
    """device_0's credential cannot speak for device 1, nor make the aggregator answer requests nobody sent."""
    bundle_id = broker[2]
    source, rogue = _fleet_and_rogue(broker, fleet)
    key = wire.bundle_key(bundle_id)
    try:
        for request in range(10_000, 10_020):  # vectors for requests no source sent
            rogue.publish(topic(bundle_id, "dev", 0),
                          wire.encode(wire.KIND_DEVICE, key, request, np.ones((1, WIDTHS[0]), np.float32)))
        pixel = (images(1, seed=6).numpy() * 255).astype(np.uint8)
        request = source.next_request
        # device 1's vector for the coming request, forged by device_0's credential on its own topic
        rogue.publish(topic(bundle_id, "dev", 0), wire.encode(wire.KIND_DEVICE, key, request,
                                                              np.full((1, WIDTHS[1]), 50.0, np.float32), device=1))
        rogue.loop(timeout=0.5)
        assert source.send(pixel) == request
        answer = source.wait(request, 10.0)
        stats = _stats_once_aggregator_dropped(source, "unsolicited", 20)
        fleet.check_alive()
    finally:
        source.close()
        rogue.disconnect()
    assert answer is not None and answer.flags == 0, "answered from the real devices' vectors"
    np.testing.assert_allclose(answer.logits[0], Bundle.load(bundle, threads=1).predict(pixel)[0], atol=1e-5)
    assert stats["aggregator"]["computed"] == 1, "no answer for a request that only a device vector named"
    dropped = stats["aggregator"]["dropped"]
    assert dropped.get("spoofed") == 1 and dropped.get("unsolicited") == 20


@pytest.fixture
def patient_fleet(bundle: Path, broker, tmp_path: Path):
    """As ``fleet``, with a 1 s deadline: on a machine loaded by other work, device_1 can need more than
    50 ms to answer while the broker forwards a flood, which is lateness, not what a test is about."""
    yield from _stopped_after(bundle, broker, tmp_path, 1000.0)


def test_a_flood_from_one_credential_costs_only_its_own_messages(bundle: Path, broker, patient_fleet: Fleet):
    """20,000 vectors for requests nobody sent, published as fast as paho can, from device_0's rights: the
    aggregator's inbox holds at most its share of them, answers none, and the real request sent into
    the flood is answered in time (it waited 34.6 s behind an unbounded inbox before). The flood shares
    device_0's credential, so device_0's own vector may be the one dropped (a loaded CI machine did so):
    then the answer says device 0 was filled and carries exactly the bundle's logits without it; no
    other device is ever filled."""
    bundle_id, fleet = broker[2], patient_fleet
    source, rogue = _fleet_and_rogue(broker, fleet)
    key = wire.bundle_key(bundle_id)
    vector = np.ones((1, WIDTHS[0]), np.float32)
    pixel = (images(1, seed=11).numpy() * 255).astype(np.uint8)
    rogue.loop_start()
    try:
        for request in range(50_000, 70_000):
            rogue.publish(topic(bundle_id, "dev", 0), wire.encode(wire.KIND_DEVICE, key, request, vector))
        answer = source.wait(source.send(pixel), 30.0)
        stats = source.collect_stats(NAMES)
        fleet.check_alive()
    finally:
        rogue.loop_stop()
        source.close()
        rogue.disconnect()
    assert answer is not None and answer.flags in (0, 1), "only the flooded credential's device may be filled"
    missing = [0] if answer.flags else []
    np.testing.assert_allclose(answer.logits[0], Bundle.load(bundle, threads=1).predict(pixel, missing)[0], atol=1e-5)
    assert stats["aggregator"]["computed"] == 1, "nothing answered for the flood"
    dropped = stats["aggregator"]["dropped"]
    assert dropped.get("unsolicited", 0) + dropped.get("flood", 0) > 0, dropped


def test_no_credential_can_take_over_another_process_session(bundle: Path, broker, fleet: Fleet):
    """Connecting with the aggregator's or a device's client id (as every valid credential could) no longer
    kicks it: the broker takes each client's id from its user name."""
    server, credentials, bundle_id = broker
    source, rogue = _fleet_and_rogue(broker, fleet)
    intruders = []
    try:
        for name in ("aggregator", "device_1"):  # the ids those processes ask for, from another credential
            intruders.append(connect(server, read_credentials(credentials["rogue"]), f"nonn-{bundle_id}-{name}"))
        pixel = (images(1, seed=9).numpy() * 255).astype(np.uint8)
        answer = source.wait(source.send(pixel), 10.0)
        stats = source.collect_stats(NAMES)
        fleet.check_alive()
    finally:
        for client in intruders:
            client.disconnect()
        source.close()
        rogue.disconnect()
    assert answer is not None and answer.flags == 0, "answered by every device"
    assert all(stats[name]["reconnects"] == 0 for name in NAMES), {n: stats[n]["reconnects"] for n in NAMES}
    assert "use_username_as_clientid true" in (credentials["aggregator"].parents[2] / "mosquitto.conf").read_text()


def test_rejected_credentials_are_one_line_errors(bundle: Path, broker, tmp_path: Path):
    server, credentials, _ = broker
    user, _ = read_credentials(credentials["device_0"])
    with pytest.raises(RuntimeSetupError, match=rf"refused .* as user '{user}': Not authorized"):
        connect(server, (user, "wrong password"), "intruder")
    with pytest.raises(RuntimeSetupError, match="Not authorized"):  # anonymous access is off
        connect(server, ("", ""), "anonymous")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"username": user, "password": "nope"}))
    result = subprocess.run([sys.executable, "-m", "serve", "serve", "device", "--bundle", str(bundle), "--index", "0",
                             "--broker", server.url, "--credentials", str(wrong)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "Not authorized" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["serve", "device", "--bundle", "{missing}", "--index", "0", "--broker", "mqtt://127.0.0.1:1",
      "--credentials", "{cred}"], "no manifest.json"),
    (["serve", "device", "--bundle", "{bundle}", "--index", "7", "--broker", "mqtt://127.0.0.1:1",
      "--credentials", "{cred}"], "no part 7"),
    (["serve", "aggregator", "--bundle", "{bundle}", "--broker", "http://x", "--credentials", "{cred}"],
     "expected mqtt://HOST:PORT"),
    (["serve", "device", "--bundle", "{bundle}", "--index", "0", "--broker", "mqtt://127.0.0.1:1",
      "--credentials", "{missing}"], "not a credential file"),
    (["deploy", "--bundle", "{bundle}", "--broker", "mqtt://127.0.0.1:1"], "--broker needs --credentials-dir"),
])
def test_runtime_cli_errors_are_one_line(bundle: Path, broker, tmp_path: Path, args, message):
    _, credentials, _ = broker
    fill = {"missing": str(tmp_path / "nowhere"), "bundle": str(bundle), "cred": str(credentials["device_0"])}
    result = subprocess.run([sys.executable, "-m", "pipeline", *[a.format(**fill) for a in args]], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr


# --- model parallelism through the same runtime ---------------------------------------------------------

@pytest.fixture(scope="module")
def chain_bundle(tmp_path_factory: pytest.TempPathFactory):
    """A tiny teacher cut layer-wise over 2 devices (MAC-balanced), exported as a chain bundle."""
    from bundle.export import export_chain
    from students.model_parallel import split_modules
    from students.registry import build_model

    torch.manual_seed(0)
    teacher = build_model("wrn_10_1", 1, len(CLASSES), [0.5], [0.25]).eval()
    out = tmp_path_factory.mktemp("mp") / "export_mp"
    export_chain(split_modules(teacher, 2, IMAGE_SHAPE), out, image_shape=IMAGE_SHAPE, class_names=CLASSES,
                 calibration_images=images(16, seed=1), extra={"method": "mp"})
    return teacher, out


def test_chain_bundle_reproduces_the_model_and_needs_every_device(chain_bundle):
    teacher, path = chain_bundle
    bundle = Bundle.load(path, threads=1)
    x = images(32, seed=6)
    with torch.no_grad():
        expected = teacher(x).numpy()
    np.testing.assert_allclose(bundle.predict(x.numpy()), expected, rtol=1e-4, atol=1e-4)
    first = bundle.manifest["devices"][0]
    assert bundle.manifest["topology"] == "chain" and first["output_width"] == int(np.prod(first["output_shape"]))
    assert bundle.manifest["exchanges"] == [] and [len(d["stages"]) for d in bundle.manifest["devices"]] == [1, 1]
    second = bundle.manifest["devices"][1]["stages"][0]  # a chain device's one stage maps its predecessor's map
    assert second["input_shape"] == first["output_shape"] and second["output_shape"] == [len(CLASSES)]
    assert first["bytes_sent_per_inference"] == 4 * first["output_width"]
    with pytest.raises(ValueError, match="needs every device"):
        bundle.predict(x.numpy(), missing=[0])


def test_nonn_and_mp_side_by_side_through_one_broker_with_emulated_links(bundle: Path, chain_bundle, test_images,
                                                                        tmp_path: Path):
    _, mp_path = chain_bundle
    pixels, labels = test_images
    link = Link(mbit_per_s=50.0, latency_ms=1.0)
    report = run_deploy(bundle, tmp_path, pixels[:40], labels[:40],
                        DeployOptions(drill_images=0, deadline_ms=2000, link=link, progress=False), mp_bundle=mp_path)
    mp = report["model_parallel"]
    assert report["accuracy"]["predictions_equal_bundle"] and mp["accuracy"]["predictions_equal_bundle"]
    assert report["lost"]["total"] == 0 and mp["lost"]["total"] == 0 and mp["topology"] == "chain"
    feature_map = read_manifest(mp_path)[1]["devices"][0]["output_width"] * 4
    assert mp["per_inference"]["device_0"]["payload_bytes"] == feature_map
    assert mp["per_inference"]["device_1"]["payload_bytes"] == 4 * len(CLASSES)
    assert report["link"] == {"emulated": True, "mbit_per_s": 50.0, "latency_ms": 1.0, "scope": "all"}
    assert report["vs_mp"]["bytes_on_the_wire_ratio"] > 1
    assert "emulated links: 50.0 Mbit/s" in (tmp_path / "deploy_report.md").read_text()


def test_deploy_against_processes_started_elsewhere(bundle: Path, broker, fleet: Fleet, test_images, tmp_path: Path):
    """--broker --external: the devices and aggregator were started by someone else (here: by hand)."""
    server, credentials, _ = broker
    for name in ("device_0", "device_1", "aggregator"):
        fleet.start(name)
    pixels, labels = test_images
    report = run_deploy(bundle, tmp_path, pixels[:30], labels[:30],
                        DeployOptions(broker_url=server.url, credentials_dir=credentials[SOURCE].parents[1], external=True,
                                      drill_images=100, progress=False))
    assert report["processes"] == "external" and report["drill"] is None and not report["broker_started_by_deploy"]
    assert report["accuracy"]["predictions_equal_bundle"] and report["lost"]["total"] == 0


def test_serve_broker_writes_files_for_several_bundles(bundle: Path, chain_bundle, tmp_path: Path):
    _, mp_path = chain_bundle
    out = tmp_path / "broker"
    result = subprocess.run([sys.executable, "-m", "serve", "serve", "broker", "--bundle", str(bundle), "--bundle",
                             str(mp_path), "--out", str(out), "--port", "18830", "--write-only"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    ids = [read_manifest(p)[1]["manifest_sha256"][:12] for p in (bundle, mp_path)]
    conf = (out / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "listener 18830 0.0.0.0" in conf
    for bundle_id in ids:
        user, _ = read_credentials(out / "credentials" / bundle_id / "device_1.json")
        assert user == f"{bundle_id}.device_1"
    acl = (out / "acl").read_text()  # in the chain, device 1 reads device 0's feature map, not the image
    assert f"user {ids[1]}.device_1\ntopic read nonn/{ids[1]}/dev/0\n" in acl
    assert f"user {ids[0]}.device_1\ntopic read nonn/{ids[0]}/input\n" in acl
    assert oct((out / "passwd").stat().st_mode & 0o777) == "0o600"
    bad = subprocess.run([sys.executable, "-m", "serve", "serve", "broker", "--bundle", str(bundle), "--out",
                          str(tmp_path / "b2"), "--tls-cert", "x.crt", "--write-only"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "--tls-cert and --tls-key go together" in bad.stderr


def test_deploy_takes_its_defaults_from_the_run_config(bundle: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(bundle, run / "export")
    (run / "config.yaml").write_text("deploy:\n  window: 0\n")
    result = subprocess.run([sys.executable, "-m", "pipeline", "deploy", "--run-dir", str(run)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 1 and "deploy.window = 0: must be at least 1" in result.stderr, result.stderr


def test_deploy_mp_needs_the_export_stages_model_parallel_bundle(bundle: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(bundle, run / "export")
    for args, message in ((["--run-dir", str(run), "--mp"], "no model-parallel bundle; run `nonn export --force`"),
                          (["--bundle", str(run / "export"), "--mp"], "--mp needs --run-dir")):
        result = subprocess.run([sys.executable, "-m", "pipeline", "deploy", *args], cwd=ROOT, capture_output=True,
                                text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert result.returncode == 1 and message in result.stderr, result.stderr


def _processes_naming(path: Path, other_than: int) -> list[int]:
    """PIDs (Linux /proc) whose command line names ``path``, other than ``other_than``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != other_than:
            try:
                if str(path) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_sigterm_stops_deploy_and_every_process_it_started(bundle: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(bundle, run / "export")
    config = yaml.safe_load(TINY.read_text())
    config["data"]["synthetic"]["test_size"] = 20_000  # a stream long enough to be stopped halfway
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "deploy", "--run-dir", str(run), "--no-progress"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 120
    while len(_processes_naming(run, proc.pid)) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the broker, 2 devices and the aggregator
    assert len(_processes_naming(run, proc.pid)) >= 4, proc.stderr.read() if proc.poll() is not None else "not up"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "stopped by SIGTERM" in err, err
    deadline = time.monotonic() + 10
    while _processes_naming(run, proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_naming(run, proc.pid) == []


def _private_broker(bundle: Path, folder: Path) -> tuple[Broker, dict[str, Path], str, subprocess.Popen]:
    """A broker of the test's own (one it kills or restarts): server, credential files, bundle id, process."""
    users = Users.of(read_manifest(bundle)[1])
    port = free_port()
    files = write_broker_files(folder, [users], port)
    credentials = users.own(files)
    return Broker("127.0.0.1", port), credentials, users.bundle_id, start_broker(folder, port)


def _ready_source(server: Broker, credentials: dict[str, Path], bundle_id: str, since: float) -> Source:
    """A source, once every process has said ready since ``since`` (time.perf_counter())."""
    source = Source(server, read_credentials(credentials[SOURCE]), bundle_id, len(CLASSES), Link())
    source.wait_ready(NAMES, since, timeout_s=30.0)
    return source


def test_a_broker_restart_is_survived_subscriptions_and_all(bundle: Path, tmp_path: Path):
    """The broker goes away and comes back on the same port: every process reconnects by itself,
    subscribes again and says ready again (within 30 s; the reconnect backoff caps at 5 s), and the next
    requests are answered by all devices."""
    server, credentials, bundle_id, process = _private_broker(bundle, tmp_path / "broker")
    fleet = Fleet(bundle.resolve(), server, credentials, 1000.0, Link(), tmp_path)
    try:
        started = time.perf_counter()
        for name in NAMES:
            fleet.start(name)
        _ready_source(server, credentials, bundle_id, started).close()
        process.terminate()
        process.wait(timeout=10)
        time.sleep(1.0)  # every process has lost its connection
        process = start_broker(tmp_path / "broker", server.port)
        source = _ready_source(server, credentials, bundle_id, time.perf_counter())
        pixels = (images(4, seed=7).numpy() * 255).astype(np.uint8)
        answers = [source.wait(source.send(p[None]), 10.0) for p in pixels]
        stats = source.collect_stats(NAMES)
        source.close()
        fleet.check_alive()
    finally:
        fleet.stop()
        process.terminate()
        process.wait(timeout=10)
    assert all(a is not None and a.flags == 0 for a in answers), "answered, with every device's vector"
    expected = Bundle.load(bundle, threads=1).predict(pixels)
    np.testing.assert_allclose(np.concatenate([a.logits for a in answers]), expected, atol=1e-5)
    assert all(stats[name]["reconnects"] >= 1 for name in NAMES)
    assert "reconnected" in (tmp_path / "device_0.log").read_text()


def test_a_broker_that_dies_mid_stream_is_named_at_once(bundle: Path, tmp_path: Path):
    server, credentials, bundle_id, process = _private_broker(bundle, tmp_path / "broker")
    (tmp_path / "logs").mkdir()
    fleet = Fleet(bundle.resolve(), server, credentials, 50.0, Link(), tmp_path / "logs", process)
    source = None
    try:
        started = time.perf_counter()
        for name in NAMES:
            fleet.start(name)
        source = _ready_source(server, credentials, bundle_id, started)
        source.health = fleet.check_alive
        process.kill()
        process.wait()
        with pytest.raises(RuntimeSetupError, match="the broker exited with code -9 .*mosquitto.log"):
            source.wait(source.send((images(1, seed=12).numpy() * 255).astype(np.uint8)), 30.0)
    finally:
        if source is not None:
            source.close()
        fleet.stop()
        if process.poll() is None:
            process.kill()


def test_a_process_that_dies_mid_stream_is_named_at_once(bundle: Path, broker, fleet: Fleet):
    """The aggregator SIGKILLed mid-stream: deploy's next wait raises naming it, instead of every request
    waiting out its timeout and the stats wait blaming the wrong cause."""
    source = _watched_source(broker, fleet)
    pixels = (images(3, seed=8).numpy() * 255).astype(np.uint8)
    try:
        assert stream_sequential(source, pixels[:1], 5.0, "before", False)[0][1] is not None
        fleet.processes["aggregator"].kill()  # a death, not the drill's kill
        fleet.processes["aggregator"].wait()
        with pytest.raises(RuntimeSetupError, match="aggregator exited with code -9"):
            stream_sequential(source, pixels, 5.0, "after", False)
        with pytest.raises(RuntimeSetupError, match="aggregator exited"):
            source.collect_stats(NAMES, timeout_s=5.0)
    finally:
        source.close()


def test_a_bundle_exported_again_mid_stream_ends_the_run_saying_so(bundle: Path, broker, tmp_path: Path):
    """export --force while deploying: the running processes hold the old models, a restarted one would load
    the new; the next wait says the bundle changed instead of mixing two bundles in one report."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    fleet = Fleet(copy.resolve(), broker[0], broker[1], 50.0, Link(), tmp_path)
    source = _watched_source(broker, fleet)
    pixels = (images(2, seed=10).numpy() * 255).astype(np.uint8)
    try:
        assert stream_sequential(source, pixels[:1], 5.0, "before", False)[0][1] is not None
        manifest = copy / "manifest.json"
        manifest.write_text(manifest.read_text() + "\n")  # what a new export's swap does to the folder
        time.sleep(HEALTH_CHECK_S)  # noticed within one health-check period
        with pytest.raises(RuntimeSetupError, match=f"the bundle in {copy} changed while deploying"):
            stream_sequential(source, pixels, 5.0, "after", False)
    finally:
        source.close()
        fleet.stop()


def test_the_broker_refuses_payloads_larger_than_the_bundle_needs(bundle: Path, broker, fleet: Fleet):
    """A 10 MB payload on a device's own topic never reaches the aggregator (the broker config caps
    messages at MAX_ROWS of the bundle's largest row); the small message after it does."""
    cap = Users.of(read_manifest(bundle)[1]).message_bytes()
    broker_folder = broker[1]["aggregator"].parents[2]  # <folder>/credentials/<bundle id>/aggregator.json
    assert f"message_size_limit {cap}" in (broker_folder / "mosquitto.conf").read_text()
    source, rogue = _fleet_and_rogue(broker, fleet)
    try:
        before = source.collect_stats(NAMES)["aggregator"]["received"]
        rogue.publish(topic(broker[2], "dev", 0), b"\0" * 10_000_000, qos=1)
        rogue.publish(topic(broker[2], "dev", 0), b"x", qos=1)
        for _ in range(20):
            rogue.loop(timeout=0.1)
        stats = _stats_once_aggregator_dropped(source, "short", 1)
    finally:
        source.close()
        rogue.disconnect()
    # the small message and the second stats request arrived; the 10 MB one did not
    assert stats["aggregator"]["received"] - before == 2, stats["aggregator"]


# --- a staged bundle (SepNN): messages between the devices' stages ------------------------------

@pytest.fixture(scope="module")
def staged_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two WRN-10-1 branches that exchange half of their channels after their first block, fp16."""
    from bundle.export import export_staged
    from students.separable import Exchange, ExchangePolicy, SeparableNet

    torch.manual_seed(0)
    net = SeparableNet(2, 10, 1, IMAGE_SHAPE[0], len(CLASSES), [0.5], [0.25]).eval()
    net.aggregator.feature_mean.uniform_()
    policy = ExchangePolicy({0: Exchange((1, 0), 0.5)})
    out = tmp_path_factory.mktemp("staged") / "export"
    export_staged(net.device_stages(policy), net.stage_exchanges(policy, IMAGE_SHAPE), net.aggregator, out,
                  image_shape=IMAGE_SHAPE, class_names=CLASSES, calibration_images=images(16, seed=1),
                  form=ExportFormat("fp16"))
    return out


@contextlib.contextmanager
def _staged_fleet_and_rogue(staged_bundle: Path, tmp_path: Path):
    """The staged bundle's fleet running behind a private broker, a source, and a rogue client holding
    device_0's credential (which may publish on dev/0/x0, as device_0 may)."""
    server, credentials, bundle_id, process = _private_broker(staged_bundle, tmp_path / "broker")
    credentials["rogue"] = _add_rogue_account(tmp_path / "broker", Users.of(read_manifest(staged_bundle)[1]))
    process.terminate()
    process.wait(timeout=10)
    process = start_broker(tmp_path / "broker", server.port)  # reread the ACL and passwords with the rogue in
    fleet = Fleet(staged_bundle.resolve(), server, credentials, 1000.0, Link(), tmp_path)
    try:
        started = time.perf_counter()
        for name in NAMES:
            fleet.start(name)
        source = _ready_source(server, credentials, bundle_id, started)
        rogue = connect(server, read_credentials(credentials["rogue"]), "rogue-device_0")
        yield fleet, source, rogue, bundle_id
        source.close()
        rogue.disconnect()
    finally:
        fleet.stop()
        process.terminate()
        process.wait(timeout=10)


def _device_1_dropped(source: Source, count: int) -> dict:
    """device_1's stats once it has dropped ``count`` messages (they may still be on their way)."""
    deadline = time.monotonic() + 10
    while sum((stats := source.collect_stats(["device_1"])["device_1"])["dropped"].values()) < count:
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)
    return stats


def test_a_staged_device_drops_forged_and_malformed_peer_messages(staged_bundle: Path, tmp_path: Path):
    """A message on dev/0/x0 whose header names another device is dropped as spoofed, garbage as
    malformed, and device_1 still averages in the real device_0's channels, so the answer is the bundle's own."""
    key = wire.bundle_key(read_manifest(staged_bundle)[1]["manifest_sha256"][:12])
    manifest = read_manifest(staged_bundle)[1]
    exchange = manifest["exchanges"][0]
    shape = (exchange["channels"], *manifest["devices"][0]["stages"][0]["output_shape"][1:])
    pixel = (images(1, seed=3).numpy() * 255).astype(np.uint8)
    with _staged_fleet_and_rogue(staged_bundle, tmp_path) as (fleet, source, rogue, bundle_id):
        request = source.next_request
        x0 = topic(bundle_id, "dev", 0, "x0")
        rogue.publish(x0, wire.encode(wire.KIND_DEVICE, key, request, np.ones((1, *shape), np.float16), device=1))
        rogue.publish(x0, wire.encode(wire.KIND_DEVICE, key, request, np.ones((1, 3), np.float16)))
        rogue.loop(timeout=0.5)
        assert source.send(pixel) == request
        answer = source.wait(request, 10.0)
        stats = _device_1_dropped(source, 2)
        everyone = source.collect_stats(NAMES)
        fleet.check_alive()
    assert answer is not None and answer.flags == 0
    np.testing.assert_allclose(answer.logits[0], Bundle.load(staged_bundle, threads=1).predict(pixel)[0], atol=1e-4)
    assert stats["dropped"] == {"spoofed": 1, "malformed": 1}
    assert stats["exchanges_missed"] == 0 and everyone["device_0"]["exchanges_missed"] == 0
    # each device sent its half of 16 channels at 16 x 16 in fp16, then its 64-vector in fp16
    assert everyone["device_0"]["sent_payload_bytes"] == 8 * 16 * 16 * 2 + 64 * 2


def test_a_wrong_rows_message_held_early_does_not_crowd_out_the_right_one(staged_bundle: Path, tmp_path: Path):
    """Before device_1 has the request it cannot know its rows, so it holds every early message for the
    exchange. With device_0 down, the rogue sends one with 2 rows, then device_0's true channels: device_1
    must average in the second (no exchange missed), and the answer is device_1's vector with that exchange
    next to device_0's fill."""
    manifest = read_manifest(staged_bundle)[1]
    key = wire.bundle_key(manifest["manifest_sha256"][:12])
    exchange = manifest["exchanges"][0]
    shape = (exchange["channels"], *manifest["devices"][0]["stages"][0]["output_shape"][1:])
    pixel = (images(1, seed=4).numpy() * 255).astype(np.uint8)
    bundle = Bundle.load(staged_bundle, threads=1)
    own = run_model(bundle.device_stages[0][0], model_images(pixel, IMAGE_SHAPE))
    with _staged_fleet_and_rogue(staged_bundle, tmp_path) as (fleet, source, rogue, bundle_id):
        fleet.kill("device_0")
        request = source.next_request
        x0 = topic(bundle_id, "dev", 0, "x0")
        rogue.publish(x0, wire.encode(wire.KIND_DEVICE, key, request, np.ones((2, *shape), np.float16), device=0))
        rogue.publish(x0, wire.encode(wire.KIND_DEVICE, key, request, exchange_message(own, exchange, np.float16),
                                      device=0))
        rogue.loop(timeout=0.5)
        assert source.send(pixel) == request
        answer = source.wait(request, 10.0)
        stats = _device_1_dropped(source, 1)
    assert stats["dropped"] == {"malformed": 1} and stats["exchanges_missed"] == 0
    assert answer is not None and answer.flags == 1  # device_0's vector filled
    np.testing.assert_allclose(answer.logits[0], bundle.aggregate([None, bundle.device_vectors(pixel)[1]])[0], atol=1e-4)
    assert np.abs(answer.logits[0] - bundle.predict(pixel, missing=[0])[0]).max() > 1e-3, \
        "the exchange changes device_1's vector, or this test could not tell"
