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
from pydantic import Field, ValidationError, model_validator

from gqaprune.errors import InputError
from gqaprune.schema import Strict, TextSource
from gqaprune.scoring.registry import CHANNEL_SCORES, HEAD_SCORES
from gqaprune.stages import STAGES

RECIPE_VERSION = 1
STAGE_SCORES = {"head_prune": HEAD_SCORES, "neuron_prune": CHANNEL_SCORES}  # the scores a pruning stage picks from
STAGE_TYPES = tuple(STAGES)  # stage type names, in the order error messages list them

# each stage's config lives in its own module; re-exported here (tests and scripts import them from the recipe)
LayerDropStage, HeadPruneStage = STAGES["layer_drop"].Config, STAGES["head_prune"].Config
NeuronPruneStage, RecoverStage, AwqStage = (STAGES[t].Config for t in ("neuron_prune", "recover", "awq"))
HiddenPruneStage = STAGES["hidden_prune"].Config
StageConfig = Annotated[Union[tuple(s.Config for s in STAGES.values())], Field(discriminator="type")]


class Runtime(Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present, else CPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: the source model's dtype
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    device_map: Literal["auto"] | None = Field(
        None, description="auto: load with accelerate's big-model placement (transformers device_map='auto'), "
        "spreading an in-memory run over several GPUs within max_memory; modules placed on cpu or disk are "
        "loaded into RAM before the stages and computed on the CPU (gqaprune.io.placement)")
    max_memory: dict[int | str, int | str] | None = Field(
        None, description="with device_map: auto, the most each device may hold, e.g. {0: 70GiB, 1: 70GiB, cpu: "
        "200GiB}; keys are GPU indices, cpu or disk; sizes are bytes or accelerate's strings (GiB, MiB, GB, MB)")
    offload_folder: str | None = Field(
        None, description="with device_map: auto, where accelerate may write weights that fit no device (a "
        "temporary folder is made inside it and removed after the run; default: a temporary folder beside the output)")

    @model_validator(mode="after")
    def _placement(self):
        if self.device_map is None:
            for key in ("max_memory", "offload_folder"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} is used only with device_map: auto (set device_map: auto or remove {key})")
            return self
        limits = {}
        for device, size in (self.max_memory or {}).items():
            key = int(device) if isinstance(device, str) and device.isdigit() else device  # YAML '0': GPU 0
            if not (isinstance(key, int) and key >= 0) and key not in ("cpu", "disk"):
                raise ValueError(f"max_memory: unknown device {device!r}; use GPU indices 0, 1, ..., cpu or disk")
            if memory_size_bytes(size) is None:
                raise ValueError(f"max_memory.{device}: {size!r} is not a size; use bytes (an integer) or a number "
                                 "with GiB, MiB, KiB, GB, MB or KB, e.g. 70GiB")
            limits[key] = size
        self.max_memory = limits or None
        return self


def memory_size_bytes(size: int | str) -> int | None:
    """``size`` in bytes as accelerate reads it (``convert_file_size_to_int``), or None when it is not a size."""
    from accelerate.utils import convert_file_size_to_int

    try:
        n = convert_file_size_to_int(size)
    except (ValueError, TypeError, AttributeError):
        return None
    return n if n > 0 else None


class Calibration(TextSource):
    samples: int = Field(32, ge=1, description="number of token windows")
    seq_len: int = Field(128, ge=8)
    batch_size: int = Field(8, ge=1)
    sequential: bool = Field(
        False, description="prune and reconstruct layer by layer, feeding each layer the already pruned prefix's outputs"
    )
    pipeline: Literal["in_memory", "layerwise"] = Field(
        "in_memory", description="in_memory: load the whole model; layerwise: load, prune, repair and write one "
        "decoder layer at a time from the source safetensors (models larger than memory; layer-local scores only)"
    )


class PerplexityEval(TextSource):
    split: Literal["train", "validation", "all"] = "validation"
    seq_len: int = Field(128, ge=8, description="window length")
    stride: int | None = Field(None, ge=1, description="window step (default seq_len: disjoint windows)")
    batch_size: int = Field(8, ge=1)
    max_tokens: int | None = Field(None, ge=16, description="evaluate at most this many tokens")


class LmEvalConfig(Strict):
    tasks: list[str] | None = None  # None: the package's shipped offline tasks; [] runs none
    include_path: str | None = None
    limit: float | None = Field(None, gt=0)
    batch_size: int = Field(8, ge=1)
    num_fewshot: int | None = Field(None, ge=0)


class Gates(Strict):
    max_ppl_ratio: float | None = Field(None, gt=0)
    min: dict[str, float] = {}  # {"task/metric": value}: the after-value must be at least this
    max_drop: dict[str, float] = {}  # {"task/metric": value}: before - after must be at most this


class EvalConfig(Strict):
    perplexity: PerplexityEval | None = PerplexityEval()
    lm_eval: LmEvalConfig = LmEvalConfig()
    gates: Gates = Gates()
    prompts: list[str] | None = Field(
        None, max_length=16,
        description="prompts whose greedy continuations (40 new tokens) the card shows before and after, with "
                    "their repeated 4-gram share in report.json; null: the package's default prompts; [] none")

    @model_validator(mode="after")
    def _prompts_not_blank(self):
        for i, p in enumerate(self.prompts or []):
            if not p.strip():
                raise ValueError(f"prompts[{i}] is empty; give the text the model should continue")
        return self


class Recipe(Strict):
    version: Literal[1] = RECIPE_VERSION
    name: str = "recipe"
    model: str
    adapter: str = "auto"
    trust_remote_code: bool = False
    seed: int = 0
    runtime: Runtime = Runtime()
    calibration: Calibration = Calibration()
    stages: list[StageConfig] = Field(min_length=1)
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
        if self.runtime.device_map is not None:
            check_device_map(self)
        if self.calibration.pipeline == "layerwise":
            check_layerwise(self)
        return self


def check_stage_order(stages: list) -> None:
    """Cross-stage rules that need no model. Model-dependent ones live in gqaprune.plan."""
    for i, st in enumerate(stages):
        if STAGES[st.type].writes_output and i != len(stages) - 1:  # awq: it quantizes the saved model
            after = ", ".join(s.type for s in stages[i + 1:])
            raise ValueError(f"stages[{i}] {st.type} must be the last stage (found after it: {after})")


def check_layerwise(recipe) -> None:
    """What ``calibration.pipeline: layerwise`` can run (gqaprune.execution.layerwise): stages whose
    ``layer_local()`` holds, plus two the pipeline runs with extra sweeps over the layers: layer_drop as the
    first stage (a hidden-state sweep) and global allocation with a layer-local score (a scoring sweep)."""
    for i, st in enumerate(recipe.stages):
        where = f"stages[{i}] {st.type}"
        stage = STAGES[st.type](st)
        if stage.layer_local():
            continue
        if st.type == "layer_drop":
            if i != 0:
                raise ValueError(f"{where}: with calibration.pipeline: layerwise, layer_drop must be the first stage")
            continue
        scores = STAGE_SCORES.get(st.type)
        if scores is None:  # recover, awq (and any other stage that is not layer-local)
            raise ValueError(f"{where} needs the whole model and cannot run with calibration.pipeline: "
                             "layerwise; run it in a second recipe on the layer-wise output (or use pipeline: in_memory)")
        if not scores[st.score].layer_local:
            why = "needs whole-model gradients" if scores[st.score].needs_gradients else "measures the whole model's loss"
            local = ", ".join(n for n, s in scores.items() if s.layer_local)
            raise ValueError(f"{where}: score {st.score} {why} and cannot run with calibration.pipeline: layerwise; "
                             f"use a layer-local score: {local} (or calibration.pipeline: in_memory)")
        if st.allocation != "global":
            raise ValueError(f"{where}: allocation {st.allocation} is not available with calibration.pipeline: "
                             "layerwise; use uniform or global")
    if recipe.save_as != "auto":
        raise ValueError("save_as: mistral is not available with calibration.pipeline: layerwise; use save_as: auto")


def check_device_map(recipe) -> None:
    """What ``runtime.device_map: auto`` can run: the in-memory pipeline's pruning stages (gqaprune.io.placement)."""
    if recipe.calibration.pipeline == "layerwise":
        raise ValueError("runtime.device_map: auto needs calibration.pipeline: in_memory (layerwise already holds "
                         "one decoder layer at a time); remove device_map or use pipeline: in_memory")
    for i, st in enumerate(recipe.stages):
        if st.type in ("recover", "awq"):
            raise ValueError(f"stages[{i}] {st.type} is not available with runtime.device_map: auto (it runs the "
                             "model on one device); run it in a second recipe on this run's output without device_map")


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
