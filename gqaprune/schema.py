"""Pydantic pieces shared by the recipe and the stages' own config models.

Every stage's config is declared in that stage's module (gqaprune/stages/*.py) from these parts;
gqaprune.recipe assembles them into the recipe. `repair_mode` is the one place that decides how a
pruning stage repairs what it removed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Reconstruct = Literal["least_squares", "none"]
HOLDOUT_DEFAULT = 0.25
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


class HeldOutReconstructs(Reconstructs):
    """The ``reconstruct`` keys of head_prune, neuron_prune and hidden_prune: their repair is damped toward the
    sliced weight, and their one-shot repair (hidden_prune's layer-by-layer reader refit too) can hold
    calibration windows out to choose the damping."""

    reconstruct_damp: float = Field(0.01, gt=0, description="lambda as a fraction of the mean diagonal of the Gram "
                                    "matrix of the refit projection's kept inputs; the refit minimises its output "
                                    "error + lambda ||W' - W_K||^2, so a large lambda tends to plain slicing")

    reconstruct_holdout: float = Field(
        HOLDOUT_DEFAULT, ge=0, lt=1, description="one-shot repair: the fraction of the calibration windows held out "
        "to choose, per projection, the damping (reconstruct_damp, 10, 100 or 1000 times it) or no refit at all, "
        "whichever reproduces the held-out tokens' outputs best (then refitted on every window); 0: always refit "
        "with reconstruct_damp. head_prune and neuron_prune's sequential repair (calibration.sequential) always uses "
        "reconstruct_damp")


def repair_mode(calibration, reconstruct: str) -> RepairMode:
    """How a head or channel pruning stage repairs: not at all, once from the unpruned model's statistics
    (one_shot), or layer by layer from the already pruned prefix's inputs (sequential, calibration.sequential)."""
    if reconstruct == "none":
        return "none"
    return "sequential" if calibration.sequential else "one_shot"


def held_out_from(calib_shape: tuple[int, int], fraction: float) -> int | None:
    """The index of the first held-out calibration token (the last ``fraction`` of the N windows of T tokens,
    at least one, never all), or None when nothing is held out."""
    n, t = calib_shape
    if fraction <= 0 or n < 2:
        return None
    held = min(n - 1, max(1, round(n * fraction)))
    return (n - held) * t
