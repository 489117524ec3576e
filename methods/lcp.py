"""LCP-style low-communication parallelisation (Hadidi et al. 2020): K narrow branches trained jointly
from labels alone and merged only at the shared classifier. NoNN's structure without its teacher
signal: against NoNN it isolates what the distillation adds."""
from __future__ import annotations

from distill.modules import NoNNModule
from methods.base import Method, register
from methods.nonn import NoNN
from students.unified import UnifiedStudent


@register
class LCP(NoNN):
    name = "lcp"
    label = "LCP branches"
    sends = "its pooled feature vector"
    options = {"branches": 2, "width": 64}
    uses_partition = False
    takes_teacher = False  # LCP trains from labels alone
    default_losses = {"ce": {}}

    @classmethod
    def check_options(cls, opts: dict) -> None:
        for key in ("branches", "width"):
            if opts[key] < 1:
                raise ValueError(f"method_options.lcp.{key} = {opts[key]}: must be at least 1")

    def plan(self) -> dict:
        return {"widths": [self.opts["width"]] * self.opts["branches"]}

    check_plan = Method.check_plan  # NoNN's names the partition file, which LCP does not read

    def build(self, plan: dict) -> UnifiedStudent:
        return self._build(plan["widths"])

    def module(self, model: UnifiedStudent, plan: dict) -> NoNNModule:
        d = self.config["distill"]
        return NoNNModule(None, model, [], d["losses"], d, self.dm.num_classes, self.channels_last, plan)

    def device_entries(self, plan: dict) -> list[dict]:
        return [{"arch": arch} for arch in self.archs(len(plan["widths"]))]

    def describe(self, plan: dict) -> dict:
        return {"branch_widths": plan["widths"]}

    def summary(self, plan: dict) -> str:
        return f"branch widths {plan['widths']}"
