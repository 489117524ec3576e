"""Lightning modules: the teacher classifier, what every method's training shares, and NoNN's students."""
from __future__ import annotations

import contextlib
import random
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from distill.losses import DistillBatch, build_losses
from distill.pool import TeacherTargets
from students.networks import FeatureClassifier
from students.separable import ExchangePolicy, SeparableNet
from students.unified import UnifiedStudent

PLAN_KEY = "method_plan"  # the checkpoint entry that holds what the weights were trained on
# learning-rate schedules configure_optimizers builds: cosine and step change the rate once per epoch;
# cosine_steps anneals it every optimiser step, so a run of one or two epochs still ends at rate 0
SCHEDULES = ("cosine", "cosine_steps", "step")


class _SupervisedModule(pl.LightningModule):
    """What every training shares: the trained ``model``, SGD + schedule from a config section,
    channels_last inputs, accuracy of ``self(x)`` on the validation and test splits."""

    def __init__(self, model: torch.nn.Module, optim_cfg: dict, num_classes: int, channels_last: bool) -> None:
        super().__init__()
        self.model = model
        self.optim_cfg = optim_cfg
        self.channels_last = channels_last
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self._input(x))

    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def on_train_epoch_start(self) -> None:
        """The epoch's data order and augmentation follow the epoch number, also when resumed mid-run."""
        loader = self.trainer.train_dataloader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.current_epoch)

    def configure_optimizers(self):
        c = self.optim_cfg
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=c["lr"], momentum=c["momentum"], weight_decay=c["weight_decay"],
                              nesterov=c["nesterov"] and c["momentum"] > 0)
        epochs = self.trainer.max_epochs
        if c["schedule"] == "cosine_steps":
            steps = max(1, int(self.trainer.estimated_stepping_batches))
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if c["schedule"] == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        else:
            milestones = sorted({max(1, round(f * epochs)) for f in c["milestones"]})
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc)


class TeacherModule(_SupervisedModule):
    """Cross-entropy training of any registry architecture."""

    def __init__(self, model: FeatureClassifier, optim_cfg: dict, num_classes: int, channels_last: bool = True) -> None:
        super().__init__(model, optim_cfg, num_classes, channels_last)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss


class DistillModule(_SupervisedModule):
    """What every method's training shares: the registered losses (``distill.losses``), a frozen teacher
    kept only when one of them reads it, the method's plan saved in every checkpoint (so export never
    pairs the weights with another plan), accuracy of ``self(x)``."""

    def __init__(self, model: torch.nn.Module, plan: dict, optim_cfg: dict, num_classes: int,
                 teacher: FeatureClassifier | None = None, channels_last: bool = True,
                 losses: dict | None = None) -> None:
        super().__init__(model, optim_cfg, num_classes, channels_last)
        self.plan = plan
        self.losses = {} if losses is None else build_losses(losses)  # None: the method computes its own loss
        if any(loss.reads_teacher for loss in self.losses.values()):
            if teacher is None:
                raise ValueError(f"distill.losses {', '.join(self.losses)} read the teacher, but none was given")
        elif losses is not None:
            teacher = None  # no loss reads it: no forward passes, no memory
        self.teacher = None if teacher is None else teacher.eval().requires_grad_(False)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[PLAN_KEY] = self.plan

    def train(self, mode: bool = True) -> DistillModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher's BN statistics never move
        return self

    def teacher_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's final feature map and logits, outside autograd."""
        with torch.inference_mode():
            fmap = self.teacher.forward_features(x)
            logits = self.teacher.fc(fmap.mean(dim=(2, 3)))
        return fmap.clone(), logits.clone()  # clones are ordinary tensors that autograd may save

    def progress(self, batch_idx: int) -> float:
        """Fraction of training done at this step, in [0, 1) (0 outside a Trainer)."""
        trainer = self._trainer
        if trainer is None or not trainer.max_epochs or not trainer.num_training_batches:
            return 0.0
        batches = trainer.num_training_batches
        if batches == float("inf"):
            return 0.0
        return (trainer.current_epoch + batch_idx / batches) / trainer.max_epochs

    def step_seed(self, batch_idx: int) -> int:
        """The seed of one training step's random draws, fixed by the run's seed, the epoch and the step: a
        run resumed from a checkpoint draws what the uninterrupted run drew (the global generator is not
        checkpointed)."""
        epoch = self._trainer.current_epoch if self._trainer is not None else 0
        return torch.initial_seed() * 1_000_003 + epoch * 100_003 + batch_idx

    def unpack(self, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, TeacherTargets | None]:
        """A training batch (``x, y`` or, from the pool, ``x, y, targets``) as images in the module's memory
        format, labels and what the losses read of the teacher."""
        x, y, *pooled = batch
        x = self._input(x)
        return x, y, self.teacher_targets(x, pooled)

    def teacher_targets(self, x: torch.Tensor, pooled: Sequence[TeacherTargets]) -> TeacherTargets | None:
        """What the losses read of the teacher: the pool's stored outputs when the batch carries them
        (``x, y, targets``), else the live teacher's; None when no loss reads the teacher."""
        if self.teacher is None:
            return None
        if pooled:
            return pooled[0]
        profiler = self._trainer.profiler if self._trainer is not None else None
        with profiler.profile("teacher_forward") if profiler is not None else contextlib.nullcontext():
            fmap, logits = self.teacher_outputs(x)
        return TeacherTargets(logits, fmap, None)

    def pool_filters(self) -> list[int] | None:
        """The teacher filters whose final-map channels the losses read, in the order a pool stores
        them (None: the losses read only the teacher's logits)."""
        return None


class LogitLossModule(DistillModule):
    """The registered logit losses (``ce``, ``kd``: whatever reads no feature map) on the logits a method
    trains: by default the devices' combined output, ``self.model(x)`` (CP's class scores in class
    order); a method whose every device is a whole classifier trains each one's (VP, by overriding
    ``loss_logits``). The loss is the sum over those logits and over the losses."""

    def __init__(self, model: torch.nn.Module, plan: dict, losses: dict, optim_cfg: dict, num_classes: int,
                 teacher: FeatureClassifier | None, channels_last: bool = True) -> None:
        super().__init__(model, plan, optim_cfg, num_classes, teacher, channels_last, losses)

    def loss_logits(self, x: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        """The logits the losses read, by the name they are logged under."""
        return {"combined": self.model(x)}

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y, t = self.unpack(batch)
        teacher_logits = None if t is None else t.logits
        named = self.loss_logits(x, batch_idx)
        total = x.new_zeros((), dtype=torch.float32)
        for name, logits in named.items():
            b = DistillBatch(logits, teacher_logits, (), None, (), y, self.progress(batch_idx))
            loss = torch.stack([fn(b) for fn in self.losses.values()]).sum()
            if len(named) > 1:
                self.log(f"train/loss_{name}", loss)
            total = total + loss
        self.log("train/loss", total, prog_bar=True)
        return total


class SeparableModule(LogitLossModule):
    """A separable network (SepNN's branches) trained on its combined logits. With ``plan["policy"]`` it
    trains that exchange policy, dropping each exchange with probability ``exchange_dropout`` so that a
    late or lost peer costs little; without one it trains the weight-sharing supernet: a random policy
    each step (``ExchangePolicy.sample``), so that any policy can then be ranked on validation."""

    def __init__(self, model: SeparableNet, plan: dict, losses: dict, optim_cfg: dict, num_classes: int,
                 teacher: FeatureClassifier | None, channels_last: bool = True) -> None:
        super().__init__(model, plan, losses, optim_cfg, num_classes, teacher, channels_last)
        policy = plan.get("policy")
        self.fixed = None if policy is None else ExchangePolicy.from_dict(policy, model.num_points, model.num_devices)
        self.exchange_dropout = float(plan.get("exchange_dropout", 0.0))
        # what validation (and so the best checkpoint) measures: the trained policy, or the supernet exchanging
        # everywhere
        model.policy = self.fixed or ExchangePolicy.everywhere(model.num_points, model.num_devices)

    def loss_logits(self, x: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        rng = random.Random(self.step_seed(batch_idx))
        net = self.model
        policy = self.fixed or ExchangePolicy.sample(rng, net.num_points, net.num_devices)
        dropped = [p for p in policy.exchanges if rng.random() < self.exchange_dropout]
        return {"combined": net(x, policy=policy, dropped=dropped)}


class NoNNModule(DistillModule):
    """K students + shared classifier trained jointly, against a frozen teacher when a loss reads it
    (NoNN, the single-student baselines and LCP's branches all train here)."""

    def __init__(self, teacher: FeatureClassifier | None, student: UnifiedStudent, partitions: Sequence[Sequence[int]],
                 losses: dict, optim_cfg: dict, num_classes: int, channels_last: bool = True,
                 plan: dict | None = None) -> None:
        """``optim_cfg`` is the config's ``distill`` section: the optimiser's settings and ``student_dropout``
        (each student's vector dropped with this probability per image while training; default 0)."""
        super().__init__(student, plan if plan is not None else {"partitions": [list(p) for p in partitions]},
                         optim_cfg, num_classes, teacher, channels_last, losses)
        self.student_dropout = float(optim_cfg.get("student_dropout", 0.0))
        for i, p in enumerate(partitions):
            self.register_buffer(f"partition_{i}", torch.tensor(list(p), dtype=torch.long), persistent=False)
        self.num_partitions = len(partitions)  # 0 when no loss reads the teacher's filters (LCP)
        self._pooled_partitions: dict[tuple[int, ...], list[torch.Tensor]] = {}
        self.num_students = len(student.devices)
        self.solo_acc = torch.nn.ModuleList(MulticlassAccuracy(num_classes, average="micro")
                                            for _ in range(self.num_students))

    @property
    def student(self) -> UnifiedStudent:
        return self.model

    @property
    def partitions(self) -> list[torch.Tensor]:
        return [getattr(self, f"partition_{i}") for i in range(self.num_partitions)]

    def pool_filters(self) -> list[int] | None:
        """Ascending, whatever the split: every partition of the same filters (another seed's Louvain
        split, a random one, K=4) reads one pool instead of building its own."""
        if not any(loss.reads_maps for loss in self.losses.values()):
            return None
        return sorted({int(f) for p in self.partitions for f in p.tolist()})

    def _partitions_in(self, map_filters: list[int] | None) -> list[torch.Tensor]:
        """Each partition's channels in a teacher map that holds ``map_filters`` (None: all filters)."""
        if map_filters is None:
            return self.partitions
        key = tuple(map_filters)
        if key not in self._pooled_partitions:
            where = {f: j for j, f in enumerate(map_filters)}
            self._pooled_partitions[key] = [torch.tensor([where[int(f)] for f in p.tolist()], device=p.device)
                                            for p in self.partitions]
        return self._pooled_partitions[key]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y, t = self.unpack(batch)
        maps = self.student.forward_maps(x)
        drop = None
        if self.student_dropout > 0:
            g = torch.Generator().manual_seed(self.step_seed(batch_idx))
            drop = torch.rand(x.shape[0], self.num_students, generator=g).to(x.device) < self.student_dropout
        logits = self.student.logits_from_maps(maps, drop)
        b = DistillBatch(logits, None if t is None else t.logits, maps, None if t is None else t.fmap,
                         self._partitions_in(None if t is None else t.map_filters), y, self.progress(batch_idx))
        parts = {name: loss(b) for name, loss in self.losses.items()}
        total = torch.stack(list(parts.values())).sum()
        self.log_dict({f"train/{k}": v for k, v in parts.items()})
        self.log("train/loss", total, prog_bar=True)
        return total

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        z = self.student.vectors(self._input(x))
        agg = self.student.aggregator
        self.val_acc(agg(z), y)
        self.log("val/acc", self.val_acc, prog_bar=True)
        everyone = range(self.num_students)
        for i, metric in enumerate(self.solo_acc):
            metric(agg(agg.fill_missing(z, [j for j in everyone if j != i])), y)
            self.log(f"val/acc_only_student_{i}", metric)
