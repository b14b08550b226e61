"""The `gqaprune` command line. Every failure is one clear message and an exit code, never a traceback."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from gqaprune.errors import GqaError


def _errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GqaError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except MemoryError:
            click.echo("error: out of memory (use fewer calibration samples, a smaller batch_size, or a larger "
                       "machine)", err=True)
            sys.exit(1)
        except OSError as e:  # disk full, permissions, I/O errors outside the runner's own handling
            click.echo(f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), err=True)
            sys.exit(1)
        except RuntimeError as e:
            if type(e).__name__ != "OutOfMemoryError":  # torch's; anything else is a bug: keep the traceback
                raise
            click.echo(f"error: out of memory ({str(e).splitlines()[0]})", err=True)
            sys.exit(1)
    return wrapper


@click.group()
@click.version_option(package_name="gqaprune")
def main():
    """GQA-aware structured pruning of HuggingFace decoder LLMs, driven by YAML recipes."""


def _checked(recipe_path: str, progress: bool = True):
    from gqaprune.arch.adapter import resolve_adapter
    from gqaprune.plan import simulate
    from gqaprune.recipe import load_recipe
    from gqaprune.io.sources import read_config

    recipe, _ = load_recipe(recipe_path)
    config = read_config(recipe.model, recipe.trust_remote_code, progress)
    adapter = resolve_adapter(recipe.adapter, config.architectures)
    return recipe, config, adapter, simulate(recipe, config, adapter)


@main.command()
@click.argument("recipe", type=click.Path())
@_errors
def validate(recipe):
    """Schema and cross-stage checks against the model's config; loads no weights."""
    r, config, adapter, plans = _checked(recipe, progress=False)
    click.echo(f"{recipe}: ok ({len(r.stages)} stages on {r.model}, {config.architectures[0]}, adapter {adapter.name}; "
               f"parameters {plans[0].params:,} -> {plans[-1].params:,})")
    for note in plans[-1].notes:
        click.echo(f"note: {note}")
    from gqaprune.memory import memory_lines

    warning = memory_lines(r, config, adapter, plans)[1]
    if warning:
        click.echo(f"warning: {warning}")


@main.command()
@click.argument("recipe", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@_errors
def plan(recipe, as_json):
    """Shapes, parameters, FLOPs and weight bytes after each stage (no importance pass)."""
    r, config, adapter, plans = _checked(recipe, progress=False)
    if as_json:
        click.echo(json.dumps([p.as_dict() for p in plans], indent=2))
        return
    base = plans[0]
    click.echo(f"{'stage':<18}{'layers':>7}{'hidden':>8}{'heads/KV (per layer)':>24}{'MLP width':>12}{'params':>14}"
               f"{'GFLOP/tok':>11}{'weight MB':>11}{'KV B/tok':>10}")
    for p in plans:
        heads = sorted({f"{s['num_attention_heads']}/{s['num_key_value_heads']}" for s in p.per_layer})
        widths = sorted({s["intermediate_size"] for s in p.per_layer})
        click.echo(f"{p.name:<18}{p.num_layers:>7}{p.hidden_size:>8}{','.join(heads):>24}{','.join(map(str, widths)):>12}"
                   f"{p.params:>14,}{p.flops_per_token / 1e9:>11.4f}{p.weight_bytes / 2**20:>11.2f}"
                   f"{p.kv_cache_bytes_per_token:>10,}")
        for n in p.notes:
            click.echo(f"    note: {n}")
    last = plans[-1]
    click.echo(f"total: parameters x{last.params / base.params:.3f}, FLOPs/token x{last.flops_per_token / base.flops_per_token:.3f}, "
               f"weight bytes x{last.weight_bytes / base.weight_bytes:.3f}, KV cache x{last.kv_cache_bytes_per_token / base.kv_cache_bytes_per_token:.3f}")
    from gqaprune.memory import memory_lines

    for line in memory_lines(r, config, adapter, plans)[0]:
        click.echo(line)


@main.command()
@click.argument("recipe", type=click.Path())
@click.option("--output", type=click.Path(), default=None, help="output folder (overrides the recipe's)")
@click.option("--force", is_flag=True, help="replace an existing output folder")
@click.option("--quiet", is_flag=True, help="no progress bars")
@_errors
def run(recipe, output, force, quiet):
    """Run the recipe: prune, save, reload and compare, evaluate, write the output folder."""
    from gqaprune.runner import run as run_recipe

    # report.json records the canonical equivalent command (gqaprune run RECIPE [--output DIR] [--force])
    report = run_recipe(recipe, output, force, progress=not quiet)
    if "perplexity" in report.get("eval", {}).get("before", {}):
        b, a = report["eval"]["before"]["perplexity"], report["eval"]["after"]["perplexity"]
        click.echo(f"parameters {report['params_before']:,} -> {report['params_after']:,}; "
                   f"perplexity {b:.3f} -> {a:.3f}; round trip max |dlogit| {report['roundtrip']['max_abs_logit_diff']:.2e}")


@main.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True)
@click.option("--adapter", default="auto")
@_errors
def inspect(model, as_json, adapter):
    """Architecture, adapter, layers, heads, KV heads, valid keep counts, parameters by role."""
    from gqaprune.inspect_model import inspect_model

    info = inspect_model(model, adapter)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for k, v in info.items():
        click.echo(f"{k}: {v}")


@main.command(name="eval")
@click.argument("model")
@click.option("--recipe", type=click.Path(), default=None, help="take the eval block from this recipe")
@click.option("--tasks", default=None, help="comma-separated lm-eval tasks ('' for none)")
@click.option("--json", "as_json", is_flag=True)
@_errors
def eval_cmd(model, recipe, tasks, as_json):
    """Perplexity and lm-eval on a saved model (uniform, per-layer or AWQ folder)."""
    from gqaprune.evaluation.standalone import evaluate_folder

    res = evaluate_folder(model, recipe, tasks)
    click.echo(json.dumps(res, indent=2) if as_json else "\n".join(f"{k}: {v}" for k, v in res.items()))


@main.command()
@click.argument("output", type=click.Path())
@_errors
def verify(output):
    """Recompute the output's file hashes and compare them with report.json."""
    from gqaprune.errors import CheckFailed, InputError
    from gqaprune.report.provenance import hash_folder

    folder = Path(output)
    rep = folder / "report.json"
    if not rep.is_file():
        raise InputError(f"{output} has no report.json (not a gqaprune output folder)")
    want = json.loads(rep.read_text())["files_sha256"]
    got = hash_folder(folder)
    bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if bad:
        raise CheckFailed(f"{output}: {len(bad)} file(s) differ from report.json: " + ", ".join(
            f"{k} ({'missing' if k not in got else 'unexpected' if k not in want else 'changed'})" for k in bad))
    click.echo(f"{output}: {len(got)} files match report.json")


@main.command()
@_errors
def adapters():
    """The known architecture adapters."""
    from gqaprune.arch.adapter import builtin_adapters

    for name, a in builtin_adapters().items():
        click.echo(f"{name:<10} {', '.join(a.architectures):<24} {a.description}")


@main.command()
@click.option("--adapter", "adapter_schema", is_flag=True, help="the adapter file format instead of the recipe's")
def schema(adapter_schema):
    """JSON Schema of the recipe format (or of adapter files)."""
    if adapter_schema:
        from gqaprune.arch.adapter import Adapter

        click.echo(json.dumps(Adapter.model_json_schema(), indent=2))
    else:
        from gqaprune.recipe import recipe_json_schema

        click.echo(json.dumps(recipe_json_schema(), indent=2))


if __name__ == "__main__":
    main()
