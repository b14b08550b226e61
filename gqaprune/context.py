"""What a stage works on: the model being compressed and the run's shared inputs. No globals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from gqaprune.arch.adapter import Adapter

if TYPE_CHECKING:  # the recipe imports the stages, which import this module
    from gqaprune.recipe import Recipe


@dataclass
class RunContext:
    model: nn.Module
    adapter: Adapter
    tokenizer: object
    recipe: Recipe
    calib: torch.Tensor  # (samples, seq_len) calibration token windows
    eval_tokens: torch.Tensor | None = None  # 1-D held-out tokens for per-stage perplexity
    progress: bool = True
    teacher: nn.Module | None = None  # frozen copy of the model before the first pruning stage (distill)
    is_main_process: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def seed(self) -> int:
        return self.recipe.seed

    @property
    def batch_size(self) -> int:
        return self.recipe.calibration.batch_size

    def generator(self, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.recipe.seed * 1000003 + salt)
