"""The teacher-output pool: stored outputs belong to the very view a batch shows, the losses read the
same thing from the pool as from the live teacher, and nothing stale or damaged is ever reused."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core.io import file_lock
from core.signals import Terminated
from distill.modules import NoNNModule
from distill.pool import TeacherPool, open_pool, pool_key, prepare_pool
from imagedata.augment import apply_views
from imagedata.data import Sampling, TensorBatches
from pipeline.cli import main
from students.registry import build_model
from students.unified import UnifiedStudent
from tests.conftest import TINY

FILTERS = [5, 0, 9, 2, 7, 11, 3]  # partition order, not sorted: the pool keeps the order it is given
PARTITIONS = [[5, 0, 9], [2, 7, 11, 3]]


def teacher(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("wrn_10_1", 1, 4, [0.5], [0.25]).eval()


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (40, 1, 16, 16), generator=g, dtype=torch.uint8), torch.randint(0, 4, (40,), generator=g)


def key_for(images, labels, **changes) -> dict:
    args = {"teacher_sha256": "a" * 64, "filters": FILTERS, "views": 3, "padding": 2, "hflip": True, "seed": 0}
    args.update(changes)
    return pool_key(args["teacher_sha256"], images, labels, args["filters"], args["views"], args["padding"],
                    args["hflip"], args["seed"])


def build(folder: Path, images, labels, net=None, **changes) -> TeacherPool:
    return prepare_pool(folder, key_for(images, labels, **changes), net or teacher(), images, batch_size=16,
                        channels_last=False, progress=False)


def test_stored_outputs_are_the_teachers_on_the_stored_view(tmp_path: Path, data):
    images, labels = data
    net = teacher()
    pool = build(tmp_path / "pool", images, labels, net)
    assert pool.params.shape == (40, 3, 3) and pool.maps.shape[:3] == (40, 3, len(FILTERS))
    idx, views = torch.tensor([0, 7, 7, 39]), torch.tensor([0, 1, 2, 2])
    params, targets = pool.lookup(idx, views)
    x = apply_views(images[idx].float() / 255, params, 2)
    with torch.no_grad():
        fmap = net.forward_features(x)
        logits = net.fc(fmap.mean(dim=(2, 3)))
    torch.testing.assert_close(targets.logits, logits, atol=2e-3, rtol=2e-3)  # fp16 storage
    torch.testing.assert_close(targets.fmap, fmap[:, FILTERS], atol=2e-3, rtol=2e-3)
    assert targets.map_filters == FILTERS
    assert not torch.equal(params[1], params[2]), "the views of one image differ"
    assert len({tuple(p) for p in pool.params[:, :, :2].reshape(-1, 2).tolist()}) > 10, "crop offsets vary"


def test_batches_show_one_stored_view_per_image_and_vary_it_by_epoch(tmp_path: Path, data):
    images, labels = data
    pool = build(tmp_path / "pool", images, labels)
    ordered = TensorBatches(images, labels, batch_size=8, padding=2, hflip=True, pool=pool)  # image i at row i
    for x, _y, targets in ordered:
        assert x.shape == (8, 1, 16, 16) and targets.logits.shape == (8, 4)
    x, y, targets = next(iter(ordered))
    for i in range(8):  # the image is one of its stored views, and the targets are that very view's
        views = [v for v in range(3) if torch.equal(
            apply_views(images[i:i + 1].float() / 255, torch.from_numpy(pool.params[i, v:v + 1].astype(np.int64)), 2)[0],
            x[i])]
        assert views, f"image {i} is none of its stored views"
        assert any(torch.equal(torch.from_numpy(pool.logits[i, v].astype(np.float32)), targets.logits[i])
                   for v in views)
    shuffled = TensorBatches(images, labels, batch_size=8, sampling=Sampling(shuffle=True, drop_last=True),
                             padding=2, hflip=True, pool=pool)
    first, second = [torch.cat([t.logits for *_, t in shuffled]) for _ in range(2)]
    assert not torch.equal(first, second)


@pytest.mark.parametrize("partitions", [PARTITIONS, [[11, 2, 0], [7, 3, 9, 5]], [[3], [9, 0, 2, 11, 5, 7]]])
def test_nonn_losses_read_the_same_from_the_pool_as_from_the_live_teacher(tmp_path: Path, data, partitions):
    """Every split of the same filters asks for one pool (ascending filters), and reads its own
    partitions' channels out of it; the pool here is even stored in yet another order (FILTERS)."""
    images, labels = data
    net = teacher()
    student = UnifiedStudent.build(["wrn_10_1"], [len(p) for p in partitions], 1, 4, [0.5], [0.25], (4, 4))
    losses = {"kd": {"alpha": 0.9, "temperature": 4.0}, "filter_transfer_per_student": {"beta": 1.0e4}}
    module = NoNNModule(net, student, partitions, losses, {}, 4).eval()  # eval: BN and dropout fixed
    assert module.pool_filters() == [0, 2, 3, 5, 7, 9, 11]
    pool = build(tmp_path / "pool", images, labels, net)
    x, y, pooled = next(iter(TensorBatches(images, labels, 16, padding=2, hflip=True, pool=pool)))
    module.log = module.log_dict = lambda *a, **k: None  # outside a Trainer
    with torch.no_grad():
        live, stored = module.training_step((x, y), 0), module.training_step((x, y, pooled), 0)
    assert float(live) > 0
    torch.testing.assert_close(stored, live, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("change", ["teacher_sha256", "filters", "data", "padding", "hflip", "views", "seed"])
def test_any_changed_input_rebuilds_the_pool(tmp_path: Path, data, change: str, capsys):
    images, labels = data
    first = build(tmp_path / "pool", images, labels)
    first_logits = np.array(first.logits)
    if change == "data":
        images = images.clone()
        images[3, 0, 4, 4] ^= 1
        changes = {}
    else:
        changes = {"teacher_sha256": {"teacher_sha256": "b" * 64}, "filters": {"filters": FILTERS[:3]},
                   "padding": {"padding": 1}, "hflip": {"hflip": False}, "views": {"views": 2},
                   "seed": {"seed": 1}}[change]
    capsys.readouterr()
    again = build(tmp_path / "pool", images, labels, **changes)
    out = capsys.readouterr().out
    assert "building" in out and "built for another" in out, out
    named = {"padding": "crop_padding"}.get(change, change)
    assert named in out, f"the reason names what changed: {out}"
    assert json.loads((tmp_path / "pool" / "key.json").read_text())["key"] == key_for(images, labels, **changes)
    if change in ("padding", "hflip", "seed"):
        assert not np.array_equal(np.array(again.params), np.array(first.params))
    if change == "teacher_sha256":
        np.testing.assert_array_equal(np.array(again.logits), first_logits)  # same net: same numbers, new key


def test_a_matching_pool_is_reused_not_rebuilt(tmp_path: Path, data, capsys, monkeypatch):
    images, labels = data
    build(tmp_path / "pool", images, labels)
    import distill.pool

    monkeypatch.setattr(distill.pool, "build_pool", lambda *a, **k: pytest.fail("rebuilt a matching pool"))
    build(tmp_path / "pool", images, labels)
    assert "reusing" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete", "key"])
def test_a_damaged_pool_is_rebuilt_before_training_reads_it(tmp_path: Path, data, damage: str, capsys):
    images, labels = data
    pool = build(tmp_path / "pool", images, labels)
    expected = np.array(pool.maps)
    del pool
    target = tmp_path / "pool" / "maps.npy"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "flip_byte":
        blob = bytearray(target.read_bytes())
        blob[-7] ^= 0xFF
        target.write_bytes(bytes(blob))
    elif damage == "delete":
        target.unlink()
    else:
        (tmp_path / "pool" / "key.json").write_text("{not json")
    reason, = [why for p, why in [open_pool(tmp_path / "pool", key_for(images, labels))]]
    assert reason
    rebuilt = build(tmp_path / "pool", images, labels)
    np.testing.assert_array_equal(np.array(rebuilt.maps), expected)
    assert "building" in capsys.readouterr().out


def _interrupt(kind: str) -> None:
    if kind == "error":
        raise RuntimeError("killed mid-build")
    os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler or `kill` sends it


@pytest.mark.parametrize("kind,raised", [("error", RuntimeError), ("sigterm", Terminated)])
def test_an_interrupted_build_leaves_no_pool_behind(tmp_path: Path, data, monkeypatch, kind: str, raised: type):
    """An error or a SIGTERM mid-build: the build unwinds, its temporary folder removed (SIGTERM as
    Terminated, which ``nonn`` reports as 'stopped by SIGTERM'), and the SIGTERM handler is put back."""
    images, labels = data
    net = teacher()
    calls = {"n": 0}
    original = net.forward_features

    def interrupted_late(x):
        calls["n"] += 1
        if calls["n"] == 3:
            _interrupt(kind)
        return original(x)
    monkeypatch.setattr(net, "forward_features", interrupted_late)
    with pytest.raises(raised):
        build(tmp_path / "pool", images, labels, net)
    assert not (tmp_path / "pool").exists() and not list(tmp_path.glob(".pool.*.building"))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("method,options", [
    ("nonn", []),
    # colour images: the teacher's 4-d buffers are really converted to channels_last, and reloading the best
    # checkpoint for the test pass must still be possible (the build once made them inference tensors)
    ("nonn", ["--data.synthetic.channels", "3"]),
    ("vp", ["--distill.losses", "{kd: {}}", "--method_options.vp",
            "{variants: [{arch: wrn_10_1, scale: 1.0}, {arch: wrn_10_1, scale: 0.75}], top_k: 2}"]),
    ("cp", ["--distill.losses", "{kd: {}}", "--method_options.cp", "{groups: 2}"]),
])
def test_distillation_with_the_pool_runs_and_records_it(tmp_path: Path, method: str, options: list[str]):
    run_dir = tmp_path / "run"
    args = ["run", "--config", str(TINY), "--run-dir", str(run_dir), "--method", method, *options,
            "--distill.teacher_pool.views", "2"]
    assert main(args) == 0
    record = json.loads((run_dir / "stages" / "distill.json").read_text())["results"]
    assert record["teacher_pool"]["views"] == 2 and record["teacher_pool"]["bytes"] > 0
    assert record["teacher_pool"]["maps"] == (method == "nonn")  # VP and CP read only the logits
    assert record["peak_rss_mib"] > 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["method"]["test_acc_bundle"] > 0.5  # 4 classes: chance is 25%


def test_pool_views_must_not_be_negative(tmp_path: Path, capsys):
    assert main(["distill", "--config", str(TINY), "--run-dir", str(tmp_path / "r"),
                 "--distill.teacher_pool.views", "-1"]) != 0
    assert "distill.teacher_pool.views = -1: must be 0 or more" in capsys.readouterr().err


def test_runs_that_share_a_pool_folder_build_each_pool_once(tmp_path: Path, capsys):
    """Two seeds of a KD row read the same teacher outputs (the pool's key leaves the run's seed out):
    with distill.teacher_pool.dir the second run reuses the first one's pool instead of building its own."""
    shared = tmp_path / "pools"
    assert main(["teacher", "--config", str(TINY), "--run-dir", str(tmp_path / "teacher"), "--teacher.epochs", "1"]) == 0
    common = ["--config", str(TINY), "--method", "single", "--distill.losses", "{kd: {}}",
              "--distill.teacher_pool.views", "2", "--distill.teacher_pool.dir", str(shared), "--distill.epochs", "1",
              "--teacher.checkpoint", str(tmp_path / "teacher" / "teacher" / "best.ckpt")]
    folders = []
    for seed in (0, 1):
        run = ["--run-dir", str(tmp_path / f"kd{seed}"), "--seed", str(seed)]
        assert main(["partition", *common, *run]) == 0  # records that the single student uses none
        capsys.readouterr()
        assert main(["distill", *common, *run]) == 0
        out = capsys.readouterr().out
        assert f"teacher pool: {'reusing' if seed else 'building'} {shared}" in out, out
        record = json.loads((tmp_path / f"kd{seed}" / "stages" / "distill.json").read_text())["results"]
        folders.append(record["teacher_pool"]["folder"])
    assert folders[0] == folders[1] and Path(folders[0]).parent == shared
    assert [p.name for p in shared.iterdir() if p.suffix != ".lock"] == [Path(folders[0]).name], \
        "one pool, no build folder left"
    assert not (tmp_path / "kd0" / "teacher_pool").exists()


def test_moving_the_shared_pool_folder_leaves_the_distill_stage_up_to_date(tmp_path: Path):
    """distill.teacher_pool.dir says where the pool is kept, not what is trained."""
    from pipeline.config import load_config
    from pipeline.context import Context
    from pipeline.records import fingerprint

    here, there = (Context(load_config(TINY, ["--distill.teacher_pool.dir", str(tmp_path / d)]), tmp_path / "run")
                   for d in ("a", "b"))
    assert fingerprint(here, "distill") == fingerprint(there, "distill")
    other = Context(load_config(TINY, ["--distill.teacher_pool.views", "2"]), tmp_path / "run")
    assert fingerprint(here, "distill") != fingerprint(other, "distill")


def test_a_build_that_was_killed_outright_is_cleared_by_the_next(tmp_path: Path, data, capsys):
    """SIGKILL leaves the temporary folder behind: the next build of that pool removes it."""
    images, labels = data
    left = tmp_path / ".pool.k1ll3d.building"
    left.mkdir()
    (left / "maps.npy").write_bytes(b"\0" * 1000)
    build(tmp_path / "pool", images, labels)
    assert not left.exists() and f"removed {left}" in capsys.readouterr().out


def test_a_second_builder_waits_for_the_first_and_reuses_its_pool(tmp_path: Path, data, capsys, monkeypatch):
    """Two rows started side by side on one shared pool folder: the second waits on the folder's lock while
    the first builds, then reuses the pool instead of building it again."""
    import distill.pool

    images, labels = data
    build_pool = distill.pool.build_pool
    monkeypatch.setattr(distill.pool, "build_pool", lambda *a, **k: pytest.fail("the waiting builder built too"))
    folder, key = tmp_path / "pool", key_for(images, labels)
    result = {}
    with file_lock(tmp_path / ".pool.lock", lambda holder: None):  # this test is the first builder
        second = threading.Thread(target=lambda: result.update(pool=build(folder, images, labels)))
        second.start()
        out = ""
        while "waiting for PID" not in out:
            assert second.is_alive(), out
            time.sleep(0.05)
            out += capsys.readouterr().out
        build_pool(folder, key, teacher(), images, 16, False, False)
    second.join(timeout=60)
    assert "reusing" in capsys.readouterr().out and len(result["pool"]) == len(images)
