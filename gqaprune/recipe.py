"""The recipe: a versioned YAML file validated whole (pydantic, unknown keys are errors).

`load_recipe` reads and checks the schema and the cross-stage rules that need no
model; `gqaprune.plan.simulate` adds the checks that need the model's config
(valid head counts, widths AWQ can take) before any weights load.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gqaprune.errors import InputError

RECIPE_VERSION = 1
STAGE_TYPES = ("layer_drop", "head_prune", "neuron_prune", "recover", "awq")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _one_of(obj, names: list[str], stage: str) -> None:
    given = [n for n in names if getattr(obj, n) is not None]
    if len(given) != 1:
        raise ValueError(f"{stage} needs exactly one of {', '.join(names)} (got {', '.join(given) or 'none'})")


class Runtime(_Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present, else CPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: the source model's dtype
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")


class TextSource(_Strict):
    source: str = "builtin:pydoc"  # builtin:pydoc | file.txt | file.jsonl | saved dataset folder
    split: Literal["train", "validation", "all"] = "train"
    field: str = "text"  # jsonl / dataset field holding the text


class Calibration(TextSource):
    samples: int = Field(32, ge=1, description="number of token windows")
    seq_len: int = Field(128, ge=8)
    batch_size: int = Field(8, ge=1)
    sequential: bool = Field(
        False, description="prune and reconstruct layer by layer, feeding each layer the already pruned prefix's outputs"
    )


class LayerDropStage(_Strict):
    type: Literal["layer_drop"]
    num_layers: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0, lt=1)
    score: Literal["block_influence", "angular_block"] = "block_influence"
    protect_first: int = Field(1, ge=0)
    protect_last: int = Field(1, ge=0)
    reconstruct: Literal["least_squares", "none"] = Field(
        "least_squares", description="least_squares: refit the MLP output projection of the kept layer before each "
        "dropped run so that it also writes what the run added to the residual stream; none: drop only")
    reconstruct_damp: float = Field(0.01, gt=0, description="lambda as a fraction of the mean diagonal of X^T X")

    @model_validator(mode="after")
    def _amount(self):
        _one_of(self, ["num_layers", "fraction"], "layer_drop")
        return self


HeadScore = Literal["taylor", "taylor2", "magnitude", "activation", "random", "truncate", "reconstruction", "ablation"]
NeuronScore = Literal["taylor", "magnitude", "activation", "frequency", "random", "reconstruction"]
Reconstruct = Literal["least_squares", "none"]


class HeadPruneStage(_Strict):
    type: Literal["head_prune"]
    unit: Literal["group", "query_head"] = "group"
    prune_ratio: float | None = Field(None, gt=0, lt=1)
    keep_kv_heads: int | None = Field(None, ge=1)
    keep_q_per_kv: int | None = Field(None, ge=1)
    round: Literal["exact", "nearest"] = "exact"  # exact: a ratio that cannot be met is an error
    score: HeadScore = "taylor"
    taylor_mix: float | None = Field(None, ge=0, description="taylor2 + taylor_mix * taylor")
    reconstruct: Reconstruct = "least_squares"
    reconstruct_damp: float = Field(0.01, gt=0, description="lambda as a fraction of the mean diagonal of C[K,K]")
    allocation: Literal["uniform", "global", "by_layer_importance"] = "uniform"
    min_groups_per_layer: int = Field(1, ge=1)
    protect_layers: list[int] = []

    @model_validator(mode="after")
    def _amount(self):
        _one_of(self, ["prune_ratio", "keep_kv_heads", "keep_q_per_kv"], "head_prune")
        if self.unit == "group" and self.keep_q_per_kv is not None:
            raise ValueError("keep_q_per_kv goes with unit: query_head (unit: group takes prune_ratio or keep_kv_heads)")
        if self.unit == "query_head" and self.keep_kv_heads is not None:
            raise ValueError("keep_kv_heads goes with unit: group (unit: query_head takes prune_ratio or keep_q_per_kv)")
        if self.taylor_mix is not None and self.score != "taylor2":
            raise ValueError("taylor_mix goes with score: taylor2")
        return self


class NeuronPruneStage(_Strict):
    type: Literal["neuron_prune"]
    prune_ratio: float | None = Field(None, gt=0, lt=1)
    keep: int | None = Field(None, ge=1)
    score: NeuronScore = "taylor"
    align: int = Field(64, ge=1, description="kept width is a multiple of this")
    reconstruct: Reconstruct = "least_squares"
    reconstruct_damp: float = Field(0.01, gt=0)
    allocation: Literal["uniform", "global"] = "uniform"
    protect_layers: list[int] = []
    frequency_threshold: float = Field(1e-3, ge=0, description="|activation| above this counts as firing (score: frequency)")

    @model_validator(mode="after")
    def _amount(self):
        _one_of(self, ["prune_ratio", "keep"], "neuron_prune")
        return self


class RecoverStage(_Strict):
    type: Literal["recover"]
    method: Literal["lora", "full", "distill"] = "lora"
    data: TextSource | None = None  # default: the calibration source's train split
    steps: int = Field(50, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(128, ge=8)
    grad_accum: int = Field(1, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_roles: list[Literal["q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down"]] = [
        "q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down"]
    alpha: float = Field(1.0, ge=0, le=1, description="distill: weight of the KL term; 1 - alpha weighs the LM loss")
    temperature: float = Field(1.0, gt=0)
    log_every: int = Field(10, ge=1)


class AwqStage(_Strict):
    type: Literal["awq"]
    w_bit: Literal[4] = 4
    group_size: int = Field(128, ge=32)
    zero_point: bool = True
    samples: int = Field(64, ge=1)
    seq_len: int = Field(256, ge=16)


Stage = Annotated[
    Union[LayerDropStage, HeadPruneStage, NeuronPruneStage, RecoverStage, AwqStage], Field(discriminator="type")
]


class PerplexityEval(TextSource):
    split: Literal["train", "validation", "all"] = "validation"
    seq_len: int = Field(128, ge=8, description="window length")
    stride: int | None = Field(None, ge=1, description="window step (default seq_len: disjoint windows)")
    batch_size: int = Field(8, ge=1)
    max_tokens: int | None = Field(None, ge=16, description="evaluate at most this many tokens")


class LmEvalConfig(_Strict):
    tasks: list[str] | None = None  # None: the package's shipped offline tasks; [] runs none
    include_path: str | None = None
    limit: float | None = Field(None, gt=0)
    batch_size: int = Field(8, ge=1)
    num_fewshot: int | None = Field(None, ge=0)


class Gates(_Strict):
    max_ppl_ratio: float | None = Field(None, gt=0)
    min: dict[str, float] = {}  # {"task/metric": value}: the after-value must be at least this
    max_drop: dict[str, float] = {}  # {"task/metric": value}: before - after must be at most this


class EvalConfig(_Strict):
    perplexity: PerplexityEval | None = PerplexityEval()
    lm_eval: LmEvalConfig = LmEvalConfig()
    gates: Gates = Gates()


class Recipe(_Strict):
    version: Literal[1] = RECIPE_VERSION
    name: str = "recipe"
    model: str
    adapter: str = "auto"
    trust_remote_code: bool = False
    seed: int = 0
    runtime: Runtime = Runtime()
    calibration: Calibration = Calibration()
    stages: list[Stage] = Field(min_length=1)
    eval: EvalConfig | None = None
    output: str | None = None
    save_as: Literal["auto", "mistral"] = Field(
        "auto",
        description="architecture of the saved fp model. auto: the source's own (a Llama whose head count does not "
                    "divide hidden_size is then saved per-layer, reloading with trust_remote_code=True). mistral: "
                    "save a Llama without biases (attention_bias and mlp_bias false) as MistralForCausalLM, the same "
                    "computation, which stock from_pretrained reloads with any head count; the conversion is checked "
                    "on logits and needs one shape in every layer. A Mistral source is kept as it is. With an awq "
                    "stage, the converted model is what AutoAWQ quantizes (an AWQ Mistral folder)")

    @model_validator(mode="after")
    def _cross_stage(self):
        check_stage_order(self.stages)
        return self


def check_stage_order(stages: list) -> None:
    """Cross-stage rules that need no model. Model-dependent ones live in gqaprune.plan."""
    for i, st in enumerate(stages):
        if st.type == "awq" and i != len(stages) - 1:
            after = ", ".join(s.type for s in stages[i + 1:])
            raise ValueError(f"stages[{i}] awq must be the last stage (found after it: {after})")


def default_eval(recipe: Recipe) -> EvalConfig:
    """No eval block: perplexity on the held-out part of the calibration source + shipped lm-eval tasks."""
    if recipe.eval is not None:
        return recipe.eval
    cal = recipe.calibration
    return EvalConfig(perplexity=PerplexityEval(source=cal.source, field=cal.field, split="validation"))


# --- loading, with file and line in every error ---------------------------------------------------


def _line_of(node, loc: tuple) -> int | None:
    """1-based line of the YAML node at a pydantic error location (best effort)."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if k.value == key:
                    nxt = (k, v)
                    break
            if nxt is None:
                if key in STAGE_TYPES:  # discriminated-union tag, not a YAML key
                    continue
                return line
            line = nxt[0].start_mark.line + 1
            node = nxt[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            # discriminated-union tags such as 'head_prune' sit in the location; skip them
            continue
    return line


def parse_recipe(text: str, where: str = "<recipe>") -> Recipe:
    try:
        raw = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)  # nodes only (no objects); SafeLoader all the same
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise InputError(f"{where}{line}: not valid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{where}: a recipe must be a YAML mapping with at least model, stages and output")
    try:
        return Recipe(**raw)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = tuple(x for x in err["loc"])
            path = ".".join(str(x) for x in loc if x not in STAGE_TYPES)
            line = _line_of(node, loc)
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "literal_error":
                msg = f"{msg} (got {err.get('input')!r})"
            elif err["type"] == "union_tag_invalid":
                msg = ("unknown stage type " + repr(err.get("input", {}).get("type") if isinstance(err.get("input"), dict) else "")
                       + "; valid: " + ", ".join(STAGE_TYPES))
            elif err["type"] == "missing":
                msg = "required key is missing"
            msgs.append(f"{where}{':' + str(line) if line else ''}: {path or 'recipe'}: {msg}")
        raise InputError("\n".join(msgs)) from None


def load_recipe(path: str | Path) -> tuple[Recipe, str]:
    """The validated recipe and its verbatim text."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot read recipe '{path}': {e.strerror or e}") from None
    return parse_recipe(text, str(path)), text


def recipe_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def recipe_json_schema() -> dict:
    return Recipe.model_json_schema()
