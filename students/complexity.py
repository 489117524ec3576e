"""Size and compute of a module: parameters, fp32 weight bytes, MACs per image (counted, not estimated)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def weight_bytes(module: nn.Module) -> int:
    """Bytes of parameters and buffers as stored in fp32 (what a device must hold)."""
    tensors = list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]
    return sum(t.numel() * 4 for t in tensors)


@torch.no_grad()
def count_macs(module: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates for one input of ``input_shape`` (no batch dim), via torch's FlopCounterMode."""
    was_training = module.training
    module.eval()
    param = next(module.parameters(), None)
    x = torch.zeros(1, *input_shape, device=param.device if param is not None else "cpu")
    with FlopCounterMode(display=False) as counter:
        module(x)
    module.train(was_training)
    return counter.get_total_flops() // 2
