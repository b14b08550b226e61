"""recover: a short fine-tune that repairs a pruned model (LoRA, full, or distillation from the original).

Methods
-------
``lora``
    peft LoRA adapters (rank ``lora_rank``, scale ``lora_alpha / lora_rank``, ``lora_dropout``) on the
    nn.Linear modules of the adapter roles in ``target_roles`` that this architecture has (q/k/v/o or the
    fused qkv, gate/up/down or the fused gate_up; roles the adapter does not define are skipped). The
    module paths come from the adapter, one exact path per layer, so per-layer-shaped (pruned) models
    work: every Linear gets its own A (r x in) and B (out x r). Before the stage ends the adapters are
    merged into the Linear weights (``merge_and_unload``): the model left in ``ctx.model`` is the plain
    model of the same class and shapes, and the saved folder needs no peft. Only LoRA weights train.
``full``
    Every parameter trains, embeddings and lm_head included (a tied lm_head is one parameter). Weight
    decay applies to matrices (ndim >= 2) only, never to norms and biases.
``distill``
    Every parameter trains (as ``full``) on ``alpha * T^2 * KL(teacher || student) + (1 - alpha) * LM``
    where the KL is between the temperature-``T`` softmaxes of the teacher's and the student's logits,
    averaged over token positions, and LM is the next-token cross-entropy. The teacher is
    ``ctx.teacher``: a frozen copy of the model as it was before the first stage, which the runner
    makes only when a recipe has a distill stage. It costs one extra copy of the ORIGINAL (unpruned)
    weights in memory for the whole run (in every process of a distributed run), plus one teacher
    forward per micro-batch. Full training rather than LoRA because the student is being pulled back
    towards a different, larger function, and the stage is meant to be short.

Data
----
``data`` (a text source; its ``split``, default train) or, by default, the calibration source's
train split. The split's tokens are one stream (units joined with EOS); every micro-batch is
``batch_size`` windows of ``seq_len`` tokens at seeded random offsets. ``steps`` counts optimizer
steps; each takes ``grad_accum`` micro-batches per process, so a step sees
``batch_size * grad_accum * world_size`` windows. The learning rate warms up linearly over
``round(warmup_ratio * steps)`` steps, then follows a cosine to 0; AdamW; gradients are clipped to a
global norm of ``GRAD_CLIP``.

Engine
------
``accelerate.Accelerator`` (``prepare``, ``accumulate``, ``backward``, ``unwrap_model``). Started by a
distributed launcher, the same recipe trains data-parallel (DDP; gloo on CPU, NCCL on GPUs)::

    accelerate launch --multi_gpu --num_processes 2 -m gqaprune run RECIPE   # also on a CPU-only host
    torchrun --nproc_per_node 2 -m gqaprune run RECIPE                       # the same thing

On a host without GPUs the stage's ``Accelerator(cpu=True)`` joins the processes over gloo. Note that
``accelerate launch --cpu --num_processes 2`` starts ONE process in accelerate 1.x (its CPU launcher
only spawns several through ``--mpirun_hostfile``); the stage report's ``world_size`` says what ran.
Every process draws its own windows (the generator is seeded with the recipe seed, the index of this
recover stage among the run's recover stages and the process index); DDP averages the gradients, so
all processes end with the same weights (and later stages make the same decisions on every rank).
Single-process runs are deterministic given the recipe seed. The global torch RNG is forked during
the stage, so the stage neither depends on nor disturbs the RNG state of the rest of the run.

After training the model is unwrapped (and merged, for LoRA), put in eval mode, and every
parameter's ``requires_grad`` flag is restored to what it was before the stage.

Report entry: method, engine, world_size, steps and the batch settings, trainable_params, the data
source, ``loss_curve`` ([{step, loss, lr}] at step 1, every ``log_every`` steps and the last step,
averaged over the processes; distill adds its kl and lm parts), loss_first/loss_last, ``heldout_perplexity``
{before, after, tokens}: the stage's own perplexity before and after training on the first
``PPL_MAX_TOKENS`` evaluation tokens (None without evaluation tokens; the runner adds
``perplexity_after`` on the whole evaluation set to every stage), and train_seconds.
"""

from __future__ import annotations

import gc
import math
import time
import warnings

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from gqaprune.arch.adapter import Adapter, decoder_layers, get_module
from gqaprune.context import RunContext
from gqaprune.errors import CheckFailed, InputError
from gqaprune.schema import Strict, TextSource
from gqaprune.stages.base import PlanInput, Planned, Stage, unchanged


class RecoverStage(Strict):
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


GRAD_CLIP = 1.0  # max global gradient norm
PPL_MAX_TOKENS = 4096  # the stage's own before/after perplexity looks at this many held-out tokens
ADAM_BETAS = (0.9, 0.999)
_SALT = 770_000  # keeps the stage's generators apart from the other stages'


# --- LoRA -------------------------------------------------------------------------------------------


def lora_target_modules(model: nn.Module, adapter: Adapter, roles: list[str]) -> list[str]:
    """Exact module paths (relative to ``model``) of the nn.Linear modules of ``roles`` in every layer.

    Roles this adapter does not define (``qkv`` on Llama, ``q`` on Phi-3, ``gate`` on Phi-2...) are skipped.
    """
    paths = []
    defined = [r for r in roles if getattr(adapter.layer, r, None) is not None]
    for i, layer in enumerate(decoder_layers(model, adapter)):
        for role in defined:
            rel = getattr(adapter.layer, role)
            if isinstance(get_module(layer, rel), nn.Linear):
                paths.append(f"{adapter.model.layers}.{i}.{rel}")
    if not paths:
        raise InputError(f"recover: none of target_roles {roles} is an nn.Linear role of adapter '{adapter.name}'")
    return paths


def apply_lora(model: nn.Module, adapter: Adapter, cfg: RecoverStage):
    """Wrap ``model`` in a peft LoRA model (only the LoRA weights trainable). Seed torch's RNG first for a
    reproducible initialisation of the A matrices (B starts at zero, so the model is unchanged)."""
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(model, adapter, list(cfg.target_roles))
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=targets, bias="none")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft asks a deprecated name
        return get_peft_model(model, config)


def merge_lora(peft_model) -> nn.Module:
    """Merge the LoRA weights into their Linear layers and return the plain base model (no peft modules)."""
    merged = peft_model.merge_and_unload()
    for name, mod in merged.named_modules():
        if type(mod).__module__.startswith("peft."):
            raise CheckFailed(f"recover: merging LoRA left a peft module at {name} ({type(mod).__name__})")
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in merged.__dict__:
            delattr(merged, attr)
    return merged


# --- data and losses --------------------------------------------------------------------------------


def training_stream(ctx: RunContext, cfg: RecoverStage) -> tuple[torch.Tensor, dict]:
    from gqaprune.io.data import token_stream

    if cfg.data is not None:
        src = cfg.data
        source, split, field = src.source, src.split, src.field
    else:
        cal = ctx.recipe.calibration
        source, split, field = cal.source, "train", cal.field
    stream = token_stream(ctx.tokenizer, source, split, field)
    if stream.numel() < cfg.seq_len + 1:
        raise InputError(f"recover: data source '{source}' ({split}) has {stream.numel()} tokens, fewer than one "
                         f"window of seq_len={cfg.seq_len}")
    return stream, {"source": source, "split": split, "field": field, "tokens": int(stream.numel())}


def draw_windows(stream: torch.Tensor, n: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - seq_len + 1, (n,), generator=gen)
    return torch.stack([stream[s: s + seq_len] for s in starts.tolist()])  # (n, seq_len)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of (B, T, V) logits on (B, T) ids."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over token positions."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, v).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, v).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps (first step already > 0), then cosine to 0 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


# --- the stage --------------------------------------------------------------------------------------


class Recover(Stage):
    name = "recover"
    Config = RecoverStage

    def plan(self, shapes: list[dict], inp: PlanInput) -> Planned:
        return Planned(unchanged(shapes), [], {})  # trains the weights; shapes stay

    def needs_teacher(self) -> bool:
        return self.cfg.method == "distill"  # the KL term's logits come from the model before pruning

    @classmethod
    def card_what(cls, s: dict) -> str:
        return f"recovery fine-tuning ({s.get('method')}, {s.get('steps')} steps)"

    def _heldout_ppl(self, ctx: RunContext, model: nn.Module) -> float | None:
        if ctx.eval_tokens is None:
            return None
        from gqaprune.evaluation.perplexity import perplexity
        from gqaprune.recipe import default_eval  # the recipe imports this module for RecoverStage

        p = default_eval(ctx.recipe).perplexity
        seq_len = p.seq_len if p is not None else self.cfg.seq_len
        tokens = ctx.eval_tokens[:PPL_MAX_TOKENS]
        if tokens.numel() < 2:
            return None
        return perplexity(model, tokens, seq_len=seq_len, batch_size=8, progress=False)["perplexity"]

    def apply(self, ctx: RunContext) -> dict:
        c = self.cfg
        t0 = time.perf_counter()
        call = getattr(ctx, "_recover_calls", 0)  # this run's n-th recover stage: fresh windows each time
        ctx._recover_calls = call + 1
        base = ctx.model
        device = next(base.parameters()).device
        flags = {n: p.requires_grad for n, p in base.named_parameters()}
        teacher = None
        if c.method == "distill":
            teacher = ctx.teacher
            if teacher is None:
                raise CheckFailed("recover (distill) needs the teacher: the runner keeps a copy of the model before "
                                  "the first stage when a recipe has a distill stage (ctx.teacher is unset)")
            teacher.eval().requires_grad_(False)
        stream, data_info = training_stream(ctx, c)
        ppl_before = self._heldout_ppl(ctx, base)

        from accelerate import Accelerator

        accelerator = Accelerator(cpu=device.type == "cpu", gradient_accumulation_steps=c.grad_accum,
                                  step_scheduler_with_optimizer=False)
        world, rank = accelerator.num_processes, accelerator.process_index
        show = ctx.progress and accelerator.is_main_process
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(ctx.seed * 1000003 + _SALT + call)  # same LoRA init / dropout stream on every rank
            if c.method == "lora":
                model = apply_lora(base, ctx.adapter, c)
            else:
                model = base.requires_grad_(True)
            trainable = [p for p in model.parameters() if p.requires_grad]
            n_trainable = sum(p.numel() for p in trainable)
            n_total = sum(p.numel() for p in model.parameters())
            optimizer = _adamw(trainable, c)
            warmup = round(c.warmup_ratio * c.steps)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, c.steps, warmup))
            model.train()
            model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
            gen = ctx.generator(_SALT + 1000 * call + rank)

            curve = []
            bar = tqdm(range(c.steps), desc=f"recover ({c.method})", disable=not show, leave=False)
            for step in bar:
                step_loss = torch.zeros(3, device=accelerator.device)  # total, kl, lm
                for _ in range(c.grad_accum):
                    ids = draw_windows(stream, c.batch_size, c.seq_len, gen).to(accelerator.device)
                    with accelerator.accumulate(model):
                        loss, parts = _batch_loss(model, teacher, ids, c)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            accelerator.clip_grad_norm_(trainable, GRAD_CLIP)
                        optimizer.step()
                        if accelerator.sync_gradients:
                            scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    step_loss += parts / c.grad_accum
                done = step + 1
                if step == 0 or done % c.log_every == 0 or done == c.steps:
                    mean = accelerator.reduce(step_loss, reduction="mean") if world > 1 else step_loss
                    entry = {"step": done, "loss": round(float(mean[0]), 5), "lr": scheduler.get_last_lr()[0]}
                    if c.method == "distill":
                        entry.update(kl=round(float(mean[1]), 5), lm=round(float(mean[2]), 5))
                    curve.append(entry)
                    bar.set_postfix(loss=f"{entry['loss']:.3f}")
            bar.close()

        accelerator.wait_for_everyone()
        trained = accelerator.unwrap_model(model)
        accelerator.free_memory()  # drop the DDP wrapper (and its gradient hooks) and the optimizer state
        del model, optimizer, scheduler, trainable
        gc.collect()
        final = merge_lora(trained) if c.method == "lora" else trained
        del trained
        for n, p in final.named_parameters():
            p.requires_grad_(flags.get(n, False))
            p.grad = None
        final.eval()
        ctx.model = final
        ppl_after = self._heldout_ppl(ctx, final)
        report = {
            "method": c.method, "engine": f"accelerate ({accelerator.distributed_type.value})",
            "steps": c.steps, "lr": c.lr, "batch_size": c.batch_size, "seq_len": c.seq_len,
            "grad_accum": c.grad_accum, "warmup_steps": warmup, "world_size": world,
            "windows_per_step": c.batch_size * c.grad_accum * world,
            "tokens_seen": c.steps * c.batch_size * c.grad_accum * world * c.seq_len,
            "trainable_params": n_trainable, "total_params_while_training": n_total,
            "data": data_info, "loss_curve": curve,
            "loss_first": curve[0]["loss"], "loss_last": curve[-1]["loss"],
            "heldout_perplexity": {  # not "perplexity_after": the runner's own key for the full evaluation set
                "before": ppl_before, "after": ppl_after,
                "tokens": None if ctx.eval_tokens is None else int(min(ctx.eval_tokens.numel(), PPL_MAX_TOKENS))},
            "train_seconds": round(time.perf_counter() - t0, 3),
        }
        if c.method == "lora":
            report.update(lora_rank=c.lora_rank, lora_alpha=c.lora_alpha,
                          lora_modules=len(lora_target_modules(final, ctx.adapter, list(c.target_roles))))
        if c.method == "distill":
            report.update(alpha=c.alpha, temperature=c.temperature)
        return report


def _adamw(trainable: list, c) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights and biases are not decayed)."""
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": c.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=c.lr, betas=ADAM_BETAS)


def _batch_loss(model, teacher, ids: torch.Tensor, c) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss of one micro-batch and its detached parts (total, kl, lm) for the loss curve."""
    logits = model(input_ids=ids, use_cache=False).logits
    if teacher is None:
        loss = lm_loss(logits, ids)
        return loss, torch.stack([loss.detach(), loss.new_zeros(()), loss.detach()])
    lm = lm_loss(logits, ids) if c.alpha < 1 else logits.new_zeros((), dtype=torch.float32)
    if c.alpha > 0:
        with torch.no_grad():
            t_device = next(teacher.parameters()).device
            t_logits = teacher(input_ids=ids.to(t_device), use_cache=False).logits
        t_logits = t_logits.to(logits.device)
        if t_logits.shape != logits.shape:
            raise CheckFailed(f"recover (distill): teacher logits {tuple(t_logits.shape)} "
                              f"and student logits {tuple(logits.shape)} differ in shape")
        kl = kd_loss(logits, t_logits, c.temperature)
    else:
        kl = logits.new_zeros((), dtype=torch.float32)
    loss = c.alpha * kl + (1 - c.alpha) * lm
    return loss, torch.stack([loss.detach(), kl.detach(), lm.detach()])
