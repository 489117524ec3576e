"""Data-parallel processes: which one this is, and keeping them in step between stages.

Under ``trainer.strategy: ddp`` Lightning starts the extra processes (ranks > 0) by rerunning the
same ``nonn`` command. Those workers only join the training stages' fit and test; rank 0 alone
writes the run folder, tracks to W&B and runs the other stages, and every process waits for the
others at the end of each stage.
"""
from __future__ import annotations

import torch.distributed as dist
from pytorch_lightning.utilities.rank_zero import rank_zero_only


def is_worker() -> bool:
    """True in a data-parallel process of rank > 0."""
    return int(getattr(rank_zero_only, "rank", 0)) != 0


def sync_processes() -> None:
    """Wait for every process of the run (a no-op outside data-parallel training)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
