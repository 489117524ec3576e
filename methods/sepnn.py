"""SepNN (Lin & Wang, arXiv 2111.02489): K narrow branches, one per device, that exchange a fraction of
their channels at a few points mid-network (``students.separable``), trained jointly on their shared
classifier's logits: from the teacher with KD by default, or from labels alone (``distill.losses:
{ce: {}}``). Training drops each exchange with probability ``exchange_dropout``, so that a late or lost
peer message costs little.

``method_options.sepnn.policy`` says where the branches talk, with whom and how much:
- a mapping ``{point: {route: [...], fraction: f}}`` given by hand;
- ``everywhere`` (every point, all channels, each device from the next; also null, the default) or
  ``none`` (LCP's branches, for comparison);
- a search record (``benchmarks/sepnn_search.py``'s JSON): the most accurate policy on its validation
  Pareto front that exchanges at most ``max_exchange_bytes`` per image (null: no budget).
``head`` (default true) ends each branch in LCP's head, a 1x1 conv + BN + ReLU before pooling: both then
have the same per-device size, and on CIFAR-10 the head was worth 1.3 pp with KD and 2.9 pp from labels
(benchmarks/README.md, "SepNN"). ``init`` fine-tunes from a supernet's weights instead of training from
scratch. The bundle is staged: each device's stages are separate models with the messages between them.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from torch import nn

from bundle.export import ExportFormat, export_staged
from distill.modules import SeparableModule
from methods.base import Method, register
from students.separable import ExchangePolicy, SeparableNet


def search_choice(record: dict, max_exchange_bytes: int | None) -> dict:
    """The most accurate policy on a search record's validation front that exchanges at most
    ``max_exchange_bytes`` per image (None: any), the cheaper one of a tie."""
    fits = [r for r in record["front"] if max_exchange_bytes is None or r["exchange_bytes"] <= max_exchange_bytes]
    if not fits:
        cheapest = min(r["exchange_bytes"] for r in record["front"])
        raise ValueError(f"method_options.sepnn.max_exchange_bytes = {max_exchange_bytes}: no searched policy is "
                         f"that cheap (the cheapest exchanges {cheapest:,} B per image)")
    return max(fits, key=lambda r: (r["accuracy"], -r["exchange_bytes"]))["policy"]


@register
class SepNN(Method):
    name = "sepnn"
    label = "SepNN branches"
    sends = "a fraction of its feature map to one peer at each exchange point, then its pooled feature vector"
    options = {"branches": 2, "depth": 10, "width": 1, "policy": None, "max_exchange_bytes": None,
               "exchange_dropout": 0.1, "head": True, "init": None}
    takes_maps = False  # the branches learn the teacher's logits; they have no partition of its map
    default_losses = {"kd": {"alpha": 0.9, "temperature": 4.0}}

    @classmethod
    def check_options(cls, opts: dict) -> None:
        if opts["branches"] < 2:
            raise ValueError(f"method_options.sepnn.branches = {opts['branches']}: needs at least 2 devices")
        if (opts["depth"] - 4) % 6 or opts["depth"] < 10 or opts["width"] < 1:
            raise ValueError(f"method_options.sepnn: depth {opts['depth']}, width {opts['width']}: a Wide ResNet "
                             "branch needs depth 6n+4 >= 10 and width >= 1")
        if not 0 <= opts["exchange_dropout"] < 1:
            raise ValueError(f"method_options.sepnn.exchange_dropout = {opts['exchange_dropout']}: must be in [0, 1)")
        if opts["init"] is not None and not Path(opts["init"]).is_file():
            raise ValueError(f"method_options.sepnn.init = {opts['init']}: no such file; give a supernet checkpoint "
                             "(benchmarks/sepnn_search.py's supernet/best.ckpt) or null")
        policy = opts["policy"]
        named = isinstance(policy, str) and (policy in ("everywhere", "none") or policy.endswith(".json"))
        if policy is not None and not named and not isinstance(policy, dict):
            raise ValueError(f"method_options.sepnn.policy = {policy!r}: give a mapping of exchange points, "
                             "'everywhere', 'none', or a search record (.json) from benchmarks/sepnn_search.py")
        if isinstance(policy, dict):
            try:
                ExchangePolicy.from_dict(policy, num_points=_num_points(opts["depth"]), num_devices=opts["branches"])
            except (ValueError, TypeError) as e:
                raise ValueError(f"method_options.sepnn.policy: {e}") from e

    def policy(self) -> ExchangePolicy:
        o = self.opts
        points, devices, given = _num_points(o["depth"]), o["branches"], o["policy"]
        if given in (None, "everywhere"):
            return ExchangePolicy.everywhere(points, devices)
        if given == "none":
            return ExchangePolicy()
        if isinstance(given, str):
            path = Path(given)
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"method_options.sepnn.policy = {given}: cannot read the search record ({e})") from e
            branches = record.get("branches", {})
            if (branches.get("devices"), branches.get("arch")) != (devices, f"wrn_{o['depth']}_{o['width']}"):
                raise ValueError(f"method_options.sepnn.policy = {given}: searched for {branches.get('devices')} x "
                                 f"{branches.get('arch')}, this config trains {devices} x wrn_{o['depth']}_{o['width']}")
            given = search_choice(record, o["max_exchange_bytes"])
        return ExchangePolicy.from_dict(given, points, devices)

    def plan(self) -> dict:
        o = self.opts
        plan = {"branches": o["branches"], "depth": o["depth"], "width": o["width"],
                "policy": self.policy().to_dict(), "exchange_dropout": float(o["exchange_dropout"])}
        return {**plan, "head": True} if o["head"] else plan  # headless: the plans of runs from before heads

    def build(self, plan: dict) -> SeparableNet:
        dm = self.dm
        net = SeparableNet(plan["branches"], plan["depth"], plan["width"], dm.image_shape[0], dm.num_classes,
                           dm.mean, dm.std, head=plan.get("head", False))
        net.policy = ExchangePolicy.from_dict(plan["policy"], net.num_points, net.num_devices)
        return net

    def module(self, model: SeparableNet, plan: dict) -> SeparableModule:
        if self.opts["init"]:
            start_from(model, Path(self.opts["init"]))
        d = self.config["distill"]
        return SeparableModule(model, plan, d["losses"], d, self.dm.num_classes, self.teacher, self.channels_last)

    def device_entries(self, plan: dict) -> list[dict]:
        return [{"arch": f"wrn_{plan['depth']}_{plan['width']} branch"} for _ in range(plan["branches"])]

    def describe(self, plan: dict) -> dict:
        net = self.build(plan)
        itemsize = 2 if self.config["export"]["transport"] == "fp16" else 4
        return {"policy": plan["policy"], "exchange_dropout": plan["exchange_dropout"],
                "exchange_points": net.num_points,
                "exchange_bytes": net.exchange_bytes(net.policy, self.dm.image_shape, itemsize)}

    def summary(self, plan: dict) -> str:
        points = ", ".join(f"point {p} at {e['fraction']:.0%}" for p, e in plan["policy"].items()) or "no exchange"
        return f"{plan['branches']} x wrn_{plan['depth']}_{plan['width']} branches, {points}"

    def export(self, model: nn.Module, plan: dict, out_dir: Path, calibration: torch.Tensor, extra: dict) -> dict:
        e, dm = self.config["export"], self.dm
        return export_staged(model.device_stages(model.policy), model.stage_exchanges(model.policy, dm.image_shape),
                             model.aggregator, out_dir, image_shape=dm.image_shape, class_names=dm.class_names,
                             calibration_images=calibration,
                             form=ExportFormat(e["transport"], e["int8_weights"], e["opset"]),
                             device_entries=self.device_entries(plan), extra={**extra, "method": self.name})


def start_from(net: SeparableNet, checkpoint: Path) -> None:
    """Fine-tuning: the branches and classifier start from a supernet's weights (``sepnn_search.py``'s
    ``supernet/best.ckpt``) instead of at random; errors name the file."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    except (OSError, KeyError, RuntimeError, pickle.UnpicklingError) as e:
        raise ValueError(f"method_options.sepnn.init = {checkpoint}: not a readable Lightning checkpoint "
                         f"({str(e).splitlines()[0]})") from e
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    try:
        net.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"method_options.sepnn.init = {checkpoint}: its weights are not these branches' "
                         f"({str(e).splitlines()[0]}); give the supernet searched with the same branches") from e


def _num_points(depth: int) -> int:
    """Exchange points of a WRN-``depth`` branch: after every block but the last (``SeparableNet.cuts``)."""
    return 3 * (depth - 4) // 6 - 1
