"""Training precision chosen by what the hardware is fast at, never blindly.

Measured (benchmarks/README.md): on AMD EPYCs with AVX-512 BF16, bf16-mixed made a NoNN step 1.7-2.0x
faster and a whole standard epoch 1.30x (live teacher) and 1.43x (teacher pool) faster, and 15 epochs
from the pool in bf16 came within 0.15 pp of the live fp32 rows; on an Intel Xeon with AVX-512 BF16
but no AMX it made 3-epoch distillations 1.15x *slower*; on an AVX2-only EPYC (oneDNN emulates bf16)
10x slower. So on a CPU ``auto`` picks bf16 where AMX does the work or on an AMD CPU with AVX-512
BF16; elsewhere bf16 is opt-in (``bf16-mixed``) after measuring with ``benchmarks/profile_epoch.py
--precisions``. On a GPU ``auto`` picks bf16 wherever it is supported.
"""
from __future__ import annotations

import warnings

import torch

from core.hardware import cpu_vendor

BF16 = ("bf16-mixed", "bf16-true", "bf16")


def _on_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def native_bf16(accelerator: str) -> bool:
    """Whether the chosen accelerator computes bf16 natively (on the CPU: AVX-512 BF16 or AMX)."""
    if _on_gpu(accelerator):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def fast_bf16(accelerator: str) -> bool:
    """Whether bf16 is reliably faster than fp32 here: a bf16-capable GPU, a CPU with AMX, or an AMD CPU
    with AVX-512 BF16 (the one family where it was measured faster without AMX)."""
    if _on_gpu(accelerator):
        return native_bf16(accelerator)
    if torch.cpu._is_amx_tile_supported():
        return True
    return bool(torch.cpu._is_avx512_bf16_supported()) and cpu_vendor() == "AuthenticAMD"


def resolve_precision(requested: str, accelerator: str = "auto") -> str:
    """The Lightning precision to train with.

    ``auto`` -> ``bf16-mixed`` where bf16 is reliably faster (:func:`fast_bf16`), else ``32-true``.
    An explicit bf16 request on hardware without native bf16 falls back to ``32-true`` with a
    one-line warning.
    """
    requested = str(requested)
    if requested == "auto":
        return "bf16-mixed" if fast_bf16(accelerator) else "32-true"
    if requested in BF16 and not native_bf16(accelerator):
        warnings.warn(f"trainer.precision={requested}: this {'GPU' if _on_gpu(accelerator) else 'CPU'} has "
                      "no native bf16 (it would run several times slower); training in 32-true instead",
                      stacklevel=2)
        return "32-true"
    return requested
