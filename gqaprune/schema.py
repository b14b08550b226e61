"""Pydantic pieces shared by the recipe and the stages' own config models.

Every stage's config is declared in that stage's module (gqaprune/stages/*.py) from these parts;
gqaprune.recipe assembles them into the recipe. `repair_mode` is the one place that decides how a
pruning stage repairs what it removed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Reconstruct = Literal["least_squares", "none"]
RepairMode = Literal["none", "one_shot", "sequential"]


class Strict(BaseModel):
    """Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def one_of(obj, names: list[str], stage: str) -> None:
    """Exactly one of ``names`` is set on ``obj`` (a model validator's check)."""
    given = [n for n in names if getattr(obj, n) is not None]
    if len(given) != 1:
        raise ValueError(f"{stage} needs exactly one of {', '.join(names)} (got {', '.join(given) or 'none'})")


class TextSource(Strict):
    source: str = "builtin:pydoc"  # builtin:pydoc | file.txt | file.jsonl | saved dataset folder
    split: Literal["train", "validation", "all"] = "train"
    field: str = "text"  # jsonl / dataset field holding the text


class Reconstructs(Strict):
    """The ``reconstruct`` keys of a pruning stage (declared once here)."""

    reconstruct: Reconstruct = Field(
        "least_squares", description="least_squares: refit the projection that consumes what was removed so that it "
        "reproduces its calibration outputs from what is kept; none: remove only")
    reconstruct_damp: float = Field(0.01, gt=0, description="lambda as a fraction of the mean diagonal of the Gram "
                                    "matrix of the refit projection's kept inputs")


def repair_mode(calibration, reconstruct: str) -> RepairMode:
    """How a head or channel pruning stage repairs: not at all, once from the unpruned model's statistics
    (one_shot), or layer by layer from the already pruned prefix's inputs (sequential, calibration.sequential)."""
    if reconstruct == "none":
        return "none"
    return "sequential" if calibration.sequential else "one_shot"
