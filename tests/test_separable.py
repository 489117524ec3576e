"""Separable networks (SepNN's branches): what an exchange does, what a missing message does, what it costs."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from students.separable import Exchange, ExchangePolicy, SeparableNet, average_in, pareto_front, rank_policies


@pytest.fixture(scope="module")
def net() -> SeparableNet:
    torch.manual_seed(0)
    return SeparableNet(2, 10, 1, 1, 4, [0.5], [0.25]).eval()


def test_an_exchange_averages_the_first_channels_and_a_missing_message_changes_nothing():
    own, peer = torch.arange(8.0).reshape(1, 4, 1, 2), torch.zeros(1, 4, 1, 2)
    mixed = average_in(own, peer, 0.5)  # ceil(0.5 * 4) = 2 channels
    assert torch.equal(mixed[:, :2], own[:, :2] / 2) and torch.equal(mixed[:, 2:], own[:, 2:])
    assert torch.equal(average_in(own, peer, 0.5, peer_missing=True), own)
    assert Exchange((1, 0), 0.5625).channels(16) == 9 and Exchange((1, 0), 0.01).channels(16) == 1


def test_without_exchanges_the_branches_are_independent_and_with_one_they_are_not(net):
    x = torch.rand(2, 1, 16, 16)
    point1 = ExchangePolicy({1: Exchange((1, 0), 0.5)})
    before = {name: [v.clone() for v in net.vectors(x, policy=p)] for name, p in
              (("none", ExchangePolicy()), ("point1", point1))}
    with torch.no_grad():
        net.stages[0][0][0].weight.mul_(2)  # change device 0's first stage only
    try:
        after = {name: net.vectors(x, policy=p) for name, p in (("none", ExchangePolicy()), ("point1", point1))}
    finally:
        with torch.no_grad():
            net.stages[0][0][0].weight.div_(2)
    assert torch.equal(before["none"][1], after["none"][1]), "no exchange: device 1 never sees device 0"
    assert not torch.allclose(before["point1"][1], after["point1"][1]), "an exchange carries device 0's map"


def test_dropped_points_and_a_missing_device_leave_the_others_as_if_nobody_sent(net):
    x = torch.rand(2, 1, 16, 16)
    everywhere = ExchangePolicy.everywhere(net.num_points, 2)
    alone = net.vectors(x, policy=ExchangePolicy())
    assert all(torch.equal(a, b) for a, b in zip(alone, net.vectors(x, policy=everywhere, dropped=[0, 1])))
    down = net.vectors(x, missing=[0], policy=everywhere)
    assert torch.equal(down[1], alone[1]) and torch.equal(down[0], torch.zeros_like(down[0]))


def test_exchange_bytes_follow_the_maps_shapes(net):
    assert net.point_shapes((1, 16, 16)) == [(16, 16, 16), (32, 8, 8)]
    policy = ExchangePolicy({1: Exchange((1, 0), 0.5), 0: Exchange((1, 0), 1.0)})
    # 2 devices x (16 ch x 16 x 16 + 16 of 32 ch x 8 x 8) x 4 bytes
    assert net.exchange_bytes(policy, (1, 16, 16)) == 2 * (16 * 256 + 16 * 64) * 4
    assert net.exchange_bytes(policy, (1, 16, 16), itemsize=2) == 2 * (16 * 256 + 16 * 64) * 2
    assert net.exchange_bytes(ExchangePolicy(), (1, 16, 16)) == 0


def test_with_lcps_head_a_branch_is_an_lcp_device_in_size_and_its_own_stages_still_give_its_vector():
    from students.networks import wide_resnet
    from students.unified import DeviceStudent

    torch.manual_seed(0)
    net = SeparableNet(2, 10, 1, 1, 4, [0.5], [0.25], head=True).eval()
    lcp_device = DeviceStudent(wide_resnet(10, 1, 1, 0, [0.5], [0.25]), 64, (4, 4))
    size = sum(p.numel() for p in lcp_device.parameters())
    headless = sum(p.numel() for p in SeparableNet(2, 10, 1, 1, 4, [0.5], [0.25]).stages[0].parameters())
    assert sum(p.numel() for p in net.stages[0].parameters()) == size == headless + 64 * 64 + 2 * 64
    policy = ExchangePolicy({0: Exchange((1, 0), 0.25)})
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        first = [stages[0](x) for stages in net.device_stages(policy)]
        mixed = [average_in(m, first[r], 0.25) for m, r in zip(first, (1, 0))]
        own = [stages[1](m) for stages, m in zip(net.device_stages(policy), mixed)]
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(own, net.vectors(x, policy=policy)))
    assert own[0].shape == (2, 64)


@pytest.mark.parametrize("spec, message", [
    ({"5": {"route": [1, 0], "fraction": 0.5}}, "exchange point 5: the branches have points 0..1"),
    ({"0": {"route": [0, 1], "fraction": 0.5}}, "route \\[0, 1\\] must give each of the 2 devices one other"),
    ({"1": {"route": [1, 0], "fraction": 0}}, "fraction 0.0 must be in \\(0, 1\\]"),
    ({"0": {"fraction": 0.5}}, "exchange point '0': give a point number and \\{route"),
    ({"first": {"route": [1, 0], "fraction": 0.5}}, "exchange point 'first'"),
])
def test_a_policy_by_hand_is_checked(spec, message):
    with pytest.raises(ValueError, match=message):
        ExchangePolicy.from_dict(spec, 2, 2)


def test_a_policy_round_trips_and_sampled_routes_never_send_a_device_its_own_map():
    rng = random.Random(0)
    for _ in range(50):
        policy = ExchangePolicy.sample(rng, 5, 3)
        assert ExchangePolicy.from_dict(policy.to_dict(), 5, 3) == policy
        assert all(r != j for e in policy.exchanges.values() for j, r in enumerate(e.route))


def test_pareto_front_keeps_only_rows_nothing_beats_on_both_counts():
    rows = [{"exchange_bytes": b, "accuracy": a, "name": n} for n, b, a in
            (("none", 0, 0.80), ("cheap", 100, 0.85), ("worse", 200, 0.84), ("best", 300, 0.90), ("tie", 300, 0.88),
             ("same", 400, 0.90))]
    assert [r["name"] for r in pareto_front(rows)] == ["none", "cheap", "best"]


def test_the_supernet_trains_on_random_policies_and_every_policy_can_then_be_ranked(tmp_path):
    """A real Lightning fit of the weight-sharing supernet on generated images, then the search's ranking
    on held-out images: accuracies well above chance for the policies, bytes as the maps say."""
    import pytorch_lightning as pl

    from distill.modules import SeparableModule
    from imagedata.datasets import make_synthetic

    raw = make_synthetic(train_size=384, test_size=128, image_size=16, channels=1, num_classes=4, seed=0)
    x, y = raw.train_images.float() / 255, raw.train_labels
    torch.manual_seed(0)
    net = SeparableNet(2, 10, 1, 1, 4, [0.5], [0.25])
    optim = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True, "schedule": "cosine"}
    module = SeparableModule(net, {}, {"ce": {}}, optim, 4, None, channels_last=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(module, loader)
    policies = [ExchangePolicy(), ExchangePolicy({1: Exchange((1, 0), 0.5)}), ExchangePolicy.everywhere(2, 2)]
    rows = rank_policies(net, raw.test_images.float() / 255, raw.test_labels, policies)
    assert [r["exchange_bytes"] for r in rows] == [0, 2 * 16 * 64 * 4, 2 * (16 * 256 + 32 * 64) * 4]
    assert all(r["accuracy"] > 0.5 for r in rows), rows  # chance: 0.25
    assert net.policy == ExchangePolicy.everywhere(2, 2), "the supernet validates exchanging everywhere"


def test_fine_tuning_starts_from_a_supernet_checkpoint_of_the_same_branches_only(tmp_path):
    import pytorch_lightning as pl

    from benchmarks.sepnn_search import write_supernet
    from distill.modules import SeparableModule
    from methods.sepnn import start_from

    torch.manual_seed(0)
    net = SeparableNet(2, 10, 1, 1, 4, [0.5], [0.25])
    optim = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True, "schedule": "cosine"}
    module = SeparableModule(net, {}, {"ce": {}}, optim, 4, None, channels_last=False)
    data = torch.utils.data.TensorDataset(torch.rand(16, 1, 16, 16), torch.randint(0, 4, (16,)))
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    trainer.save_checkpoint(tmp_path / "supernet.ckpt")
    torch.manual_seed(1)
    fresh = SeparableNet(2, 10, 1, 1, 4, [0.5], [0.25])
    start_from(fresh, tmp_path / "supernet.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))
    # sepnn_search.py --supernet-out: the weights alone, read the same way
    write_supernet(torch.load(tmp_path / "supernet.ckpt", weights_only=True), tmp_path / "compact.ckpt")
    assert (tmp_path / "compact.ckpt").stat().st_size < (tmp_path / "supernet.ckpt").stat().st_size
    again = SeparableNet(2, 10, 1, 1, 4, [0.5], [0.25])
    start_from(again, tmp_path / "compact.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values()))
    with pytest.raises(ValueError, match="supernet.ckpt: its weights are not these branches'"):
        start_from(SeparableNet(3, 10, 1, 1, 4, [0.5], [0.25]), tmp_path / "supernet.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.ckpt: not a readable Lightning checkpoint"):
        start_from(fresh, tmp_path / "junk.ckpt")


def test_each_policy_is_scored_with_its_own_batchnorm_statistics_and_the_net_keeps_its_own():
    torch.manual_seed(0)
    net = SeparableNet(2, 10, 1, 1, 4, [0.5], [0.25])
    x = torch.rand(64, 1, 16, 16)
    policy = ExchangePolicy({0: Exchange((1, 0), 1.0)})
    first_after_exchange = net.stages[0][1][0].pre[0]  # device 0's first BatchNorm after point 0
    seen = []
    hook = first_after_exchange.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    from students.separable import recalibrate_batchnorm

    recalibrate_batchnorm(net, x, policy, batch_size=64)
    hook.remove()
    assert torch.allclose(first_after_exchange.running_mean, seen[0].mean(dim=(0, 2, 3)), atol=1e-6)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rank_policies(net, x, torch.zeros(64, dtype=torch.long), [ExchangePolicy(), policy], calibration=x)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items()), "the net's own statistics are back"
    assert first_after_exchange.momentum == 0.1


@pytest.mark.slow
def test_the_search_script_ranks_policies_of_branches_with_lcps_head_and_a_head_config_fine_tunes_from_it(tmp_path):
    """benchmarks/sepnn_search.py end to end on generated images (a real teacher, the pipeline's fit, the
    ranking): with --head the supernet's branches are LCP's size, the record says so, and a SepNN config
    with ``head: true`` starts from its weights while one without the head is refused."""
    from methods.sepnn import start_from
    from pipeline.cli import main
    from tests.conftest import ROOT, TINY

    teacher_run = tmp_path / "teacher"
    assert main(["teacher", "--config", str(TINY), "--run-dir", str(teacher_run)]) == 0
    checkpoint = teacher_run / "teacher" / "best.ckpt"
    search = tmp_path / "search"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sepnn_search.py"), "--config", str(TINY),
                           "--run-dir", str(search), "--epochs", "1", "--policies", "2", "--calibration", "64",
                           "--head", "--supernet-out", str(tmp_path / "supernet.ckpt"),
                           "--set", f"teacher.checkpoint={checkpoint}",
                           "--set", "distill.losses={kd: {alpha: 0.9, temperature: 4.0}}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((search / "sepnn_search.json").read_text())
    assert record["branches"]["head"] is True and record["split"] == "validation"
    assert len(record["rows"]) >= 3 and record["front"][0]["exchange_bytes"] == 0
    start_from(SeparableNet(2, 10, 1, 1, 4, [0.5], [0.25], head=True), tmp_path / "supernet.ckpt")
    with pytest.raises(ValueError, match="its weights are not these branches'"):
        start_from(SeparableNet(2, 10, 1, 1, 4, [0.5], [0.25]), tmp_path / "supernet.ckpt")
