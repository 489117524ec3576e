"""What a method is: the one interface the stages, export, evaluation and deployment are written against.

A method takes the run's setting (config, data, trained teacher) and says
- ``plan``: what it decides before training (NoNN: the filter partition; CP: the class groups; ...),
  a JSON-able dict saved in every student checkpoint;
- ``build``: the device modules and aggregator for that plan (a ``GatherModel``, or a chain of
  segments for model parallelism);
- ``module``: the LightningModule that trains them (none when ``trains`` is False);
- ``device_entries`` / ``describe``: what the manifest and the report say about its devices;
- its options (``method_options.<name>`` in the config, defaults in ``options``), the transports and
  losses it accepts, and what each device sends.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from torch import nn

from bundle.export import ExportFormat, export_bundle
from distill.losses import LOSSES
from imagedata.data import ImageDataModule
from students.networks import FeatureClassifier

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice ({METHODS[cls.name].__module__}, {cls.__module__})")
    METHODS[cls.name] = cls
    return cls


@dataclass
class Setting:
    """What every method builds from: the resolved config, the data, the trained teacher."""

    config: dict
    dm: ImageDataModule
    teacher: FeatureClassifier
    teacher_sha256: str
    run_dir: Path


class Method:
    name: ClassVar[str]
    label: ClassVar[str]                      # for reports and tables
    sends: ClassVar[str]                      # what each device sends, in words
    options: ClassVar[dict[str, Any]] = {}    # defaults of method_options.<name>
    uses_partition: ClassVar[bool] = False    # the partition stage runs (filter graph + communities)
    trains: ClassVar[bool] = True             # False: built from the teacher as it is
    mp_baseline: ClassVar[bool] = True        # export and report the teacher's layer-wise split beside it
    transports: ClassVar[tuple[str, ...]] = ("fp32", "fp16")
    # distill.losses when the config names none: Hinton KD plus NoNN's filter-level activation transfer,
    # normalised per student (chosen by the validation sweep in benchmarks/README.md)
    default_losses: ClassVar[dict] = {"kd": {"alpha": 0.9, "temperature": 4.0},
                                      "filter_transfer_per_student": {"beta": 1.0e4}}
    takes_teacher: ClassVar[bool] = True      # it trains with losses that read the teacher (reads_teacher)
    takes_maps: ClassVar[bool] = True         # ... and with losses that read the teacher's feature maps (reads_maps)

    def __init__(self, setting: Setting) -> None:
        self.setting = setting
        self.config = setting.config
        self.opts = setting.config["method_options"][self.name]

    # --- config ------------------------------------------------------------------------------
    @classmethod
    def resolve_options(cls, given: dict | None) -> dict:
        """The defaults with ``given`` on top; an unknown key or a value of the wrong type is refused."""
        resolved = copy.deepcopy(cls.options)
        if given is not None and not isinstance(given, dict):
            raise ValueError(f"method_options.{cls.name} = {given!r}: must be a mapping of option to value; "
                             f"known options: {', '.join(cls.options) or '(none)'}")
        for key, value in (given or {}).items():
            if key not in cls.options:
                raise ValueError(f"method_options.{cls.name}: unknown option {key!r}; "
                                 f"known: {', '.join(cls.options) or '(none)'}")
            default = cls.options[key]
            if default is not None and not _same_kind(value, default):
                raise ValueError(f"method_options.{cls.name}.{key} = {value!r}: expected "
                                 f"{type(default).__name__} (like the default {default!r})")
            resolved[key] = copy.deepcopy(value)
        cls.check_options(resolved)
        return resolved

    @classmethod
    def check_options(cls, opts: dict) -> None:
        """Method-specific checks of the resolved options (ValueError with a one-line message)."""

    @classmethod
    def check_config(cls, config: dict) -> None:
        """The rest of the config must suit the method: its transports and its losses."""
        transport = config["export"]["transport"]
        if transport not in cls.transports:
            raise ValueError(f"export.transport = {transport!r}: method {cls.name} sends "
                             f"{cls.sends}; choose one of {', '.join(cls.transports)}")
        if cls.trains:
            usable = [name for name, loss in LOSSES.items() if cls.takes(loss)]
            extra = sorted(name for name in config["distill"]["losses"] or {} if name in LOSSES and name not in usable)
            if extra:
                raise ValueError(f"distill.losses: method {cls.name} trains with {', '.join(usable)} only, "
                                 f"not {', '.join(extra)}; set distill.losses accordingly")

    @classmethod
    def takes(cls, loss: type) -> bool:
        """Whether this method's devices can train with ``loss``, by what the loss reads."""
        return (cls.takes_teacher or not loss.reads_teacher) and (cls.takes_maps or not loss.reads_maps)

    # --- what the stages call ----------------------------------------------------------------
    def plan(self) -> dict:
        raise NotImplementedError

    def check_plan(self, plan: dict) -> None:
        """Refuse a checkpoint's plan that is not the one the config gives now (one-line RuntimeError)."""
        current = self.plan()
        if plan != current:
            raise RuntimeError(f"the devices in {self.setting.run_dir / 'students'} were trained with {plan}, the "
                               f"config now gives {current}; rerun `nonn distill --force`")

    def build(self, plan: dict) -> nn.Module:
        raise NotImplementedError

    def module(self, model: nn.Module, plan: dict) -> pl.LightningModule:
        raise NotImplementedError(f"method {self.name} does not train")

    def device_entries(self, plan: dict) -> list[dict]:
        """Per device, what the manifest records beside its files and sizes (at least its ``arch``)."""
        raise NotImplementedError

    def describe(self, plan: dict) -> dict:
        """The method's own entries in report.json (partition sizes, class groups, variants, ...)."""
        return {}

    def summary(self, plan: dict) -> str:
        """Those choices in a few words, for report.md."""
        return ""

    def export(self, model: nn.Module, plan: dict, out_dir: Path, calibration: torch.Tensor, extra: dict) -> dict:
        """Write the bundle (devices side by side + aggregator); returns its manifest."""
        e, dm = self.config["export"], self.dm
        return export_bundle(model, out_dir, image_shape=dm.image_shape, class_names=dm.class_names,
                             calibration_images=calibration,
                             form=ExportFormat(e["transport"], e["int8_weights"], e["opset"]),
                             device_entries=self.device_entries(plan), extra={**extra, "method": self.name})

    # --- shared helpers ----------------------------------------------------------------------
    @property
    def dm(self) -> ImageDataModule:
        return self.setting.dm

    @property
    def teacher(self) -> FeatureClassifier:
        return self.setting.teacher

    @property
    def optim(self) -> dict:
        return self.config["distill"]

    @property
    def channels_last(self) -> bool:
        return bool(self.config["trainer"]["channels_last"])


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))

