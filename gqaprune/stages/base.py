"""The shape every stage type has: its config model, its plan, its apply, and what the card and plots show.

A stage module reads top to bottom: the `Config` (the recipe keys of this type), `plan` (the counts and
shape rules, checked against the model's per-layer shapes without weights; `gqaprune plan`, `validate` and
the stage's own `apply` all call it, so a count is computed in one place), `apply` (the work, returning the
stage's report entry), then `card_what` and `plot` (what the output folder shows of that entry).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from gqaprune.arch.adapter import Adapter
    from gqaprune.context import RunContext


@dataclass
class PlanInput:
    """What a stage's plan may look at besides the per-layer shapes."""

    where: str  # "stages[2] head_prune": the prefix of every error
    config: object = None  # the source model's config (hidden size, head_dim)
    adapter: Adapter | None = None
    earlier: list = field(default_factory=list)  # Stage objects before this one in the recipe
    saved_arch: str | None = None  # the architecture the fp model is saved as (after save_as)


@dataclass
class Planned:
    """A stage's plan: per-layer shapes after it (the uniform equivalent when allocation is decided by scores at
    run time), notes for the user, and the stage's own counts, which `apply` uses as they are."""

    shapes: list[dict]  # model_shapes() rows after the stage, each with "source_layer": its index before the stage
    notes: list[str]
    counts: dict


class Stage:
    name: ClassVar[str]
    Config: ClassVar[type]
    writes_output: ClassVar[bool] = False  # True for the stage that turns the saved model into the output (awq)

    def __init__(self, cfg):
        self.cfg = cfg

    def plan(self, shapes: list[dict], inp: PlanInput) -> Planned:
        """Check this stage against the per-layer shapes (model_shapes rows) and give the shapes after it."""
        raise NotImplementedError

    def apply(self, ctx: RunContext) -> dict:
        """Run the stage on ctx.model in place; return its report entry."""
        raise NotImplementedError

    def gives_per_layer_shapes(self) -> bool:
        """Whether layers can end with different shapes (AutoAWQ and save_as: mistral need one shape)."""
        return False

    def needs_teacher(self) -> bool:
        """Whether the stage reads ``ctx.teacher``, a frozen copy of the model before the first stage, which the
        runner then keeps for the whole run (one extra copy of the unpruned weights)."""
        return False

    def layer_local(self) -> bool:
        """Whether the stage can run one decoder layer at a time (its scores and repair need only that layer's
        inputs); a layer-wise pipeline runs only such stages."""
        return False

    @classmethod
    def card_what(cls, entry: dict) -> str:
        """The model card's 'what it did' cell for this stage's report entry."""
        return cls.name

    @classmethod
    def plot(cls, entry: dict, plt):
        """(figure, file name) for this stage's report entry, or None."""
        return None


def unchanged(shapes: list[dict]) -> list[dict]:
    """The per-layer shapes of a stage that changes none (each layer keeps its index)."""
    return [dict(s, source_layer=i) for i, s in enumerate(shapes)]
