"""Precision follows the hardware: bf16 only where it is native, with a warning where it was asked for."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill import precision
from distill.precision import resolve_precision
from pipeline.context import Context
from pipeline.stages import run_stage


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Pretend the CPU has (or lacks) AVX-512 BF16 and AMX, from one vendor (Intel unless told)."""
    def set_native(native: bool, amx: bool = False, vendor: str = "GenuineIntel") -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(precision, "cpu_vendor", lambda: vendor)
    return set_native


def test_auto_picks_bf16_on_a_cpu_only_where_it_was_measured_faster(cpu_bf16):
    cpu_bf16(True, amx=True)
    assert resolve_precision("auto", "cpu") == "bf16-mixed"
    cpu_bf16(True, amx=False)  # AVX-512 BF16 alone was measured slower than fp32 on one Xeon: opt-in only
    assert resolve_precision("auto", "cpu") == "32-true"
    cpu_bf16(True, amx=False, vendor="AuthenticAMD")  # and 1.3-1.4x faster per epoch on AMD EPYCs
    assert resolve_precision("auto", "cpu") == "bf16-mixed"
    cpu_bf16(False, vendor="AuthenticAMD")  # an AVX2-only EPYC emulates bf16: 10x slower
    assert resolve_precision("auto", "cpu") == "32-true"
    cpu_bf16(False)
    assert resolve_precision("auto", "cpu") == "32-true"


def test_bf16_request_without_native_bf16_falls_back_with_a_warning(cpu_bf16):
    cpu_bf16(False)
    with pytest.warns(UserWarning, match="trainer.precision=bf16-mixed: this CPU has no native bf16"):
        assert resolve_precision("bf16-mixed", "cpu") == "32-true"
    cpu_bf16(True)
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert resolve_precision("32-true", "cpu") == "32-true"


def test_training_stage_records_the_precision_it_used(tiny_config, cpu_bf16):
    cpu_bf16(False)
    tiny_config["teacher"]["epochs"] = 1
    tiny_config["trainer"]["precision"] = "bf16-mixed"
    with pytest.warns(UserWarning, match="no native bf16"):
        results = run_stage(Context(tiny_config, Path(tiny_config["run_dir"])), "teacher")
    assert results["precision"] == "32-true"
