"""The model card (README.md of the output folder): what was removed, how, and the numbers."""

from __future__ import annotations

from pathlib import Path

from gqaprune.stages import STAGES


def _fmt(v, nd=3):
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _stage_line(s: dict) -> str:
    t = s["type"]
    what = STAGES[t].card_what(s)
    ppl = s.get("perplexity_after")
    return (f"| {s['index']} | {t} | {what} | {s['params_before']:,} -> {s['params_after']:,} | "
            f"{_fmt(ppl) if ppl is not None else '-'} | {s['seconds']:.1f} |")


def _load_snippet(report: dict) -> str:
    kind = report.get("output_kind")
    if kind == "uniform":
        return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                "model = AutoModelForCausalLM.from_pretrained(PATH)\ntokenizer = AutoTokenizer.from_pretrained(PATH)\n```")
    if kind == "per_layer":
        return ("Layers have different shapes. Load with gqaprune, or with stock transformers and the modeling file "
                "saved beside the weights:\n\n```python\nimport gqaprune\nmodel = gqaprune.load_pretrained(PATH)\n"
                "# or\nfrom transformers import AutoModelForCausalLM\n"
                "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)\n```")
    return ("AutoAWQ format (4-bit GEMM). On a GPU: `AutoAWQForCausalLM.from_quantized(PATH)` or transformers with "
            "its AWQ kernels. On a CPU, dequantized from the bytes on disk:\n\n```python\n"
            "from gqaprune.quant.awq import load_dequantized\nmodel = load_dequantized(PATH)\n```")


def _quoted(text: str) -> list[str]:
    """``text`` as a markdown block quote, one ``>`` line per line (a continuation may hold newlines)."""
    return [f"> {line}".rstrip() for line in (text if text.strip() else "(nothing)").splitlines()]


def _generation_lines(gens: dict | None) -> list[str]:
    if not gens:
        return []
    lines = ["## Generations", "",
             f"Greedy continuations (up to {gens['max_new_tokens']} new tokens) of fixed prompts, before and after "
             f"compression; the share of repeated {gens['ngram']}-grams of each continuation is in brackets.", ""]
    for i, prompt in enumerate(gens["prompts"]):
        lines += [f"**Prompt:** `{prompt}`", ""]
        for side in ("before", "after"):
            g = gens[side]
            lines += [f"*{side}* ({g['repeated_4gram_share_per_prompt'][i]:.2f}):", ""]
            lines += _quoted(prompt + g["texts"][i]) + [""]
    return lines


def _source_note(model: dict) -> list[str]:
    """A line saying the source weights were dequantized from a quantized GGUF file, when they were."""
    g = model.get("gguf")
    if not g:
        return []
    return [f"The source weights were dequantized to {g['dequantized_to']} from a quantized GGUF file "
            f"(`{Path(g['source_file']).name}`, {g['quantization']}), so \"before\" is the quantized model, "
            "not the original full-precision one.", ""]


def write_card(report: dict, recipe_text: str, path: Path) -> None:
    ev = report["eval"]
    before, after = ev["before"], ev["after"]
    lines = []
    if report["status"] != "ok":
        failed = [k for k, g in report["gates"].items() if not g["passed"]]
        lines += [f"# FAILED: quality gate {', '.join(failed)}", ""]
    name = report.get("recipe_name", "model")
    lines += [
        f"# {name}: compressed with gqaprune {report['gqaprune_version']}", "",
        f"Base model: `{report['model']['source']}` ({report['model']['architecture']}, adapter "
        f"`{report['model']['adapter']}`).", "",
        *_source_note(report["model"]),
        "## Summary", "",
        "| | before | after | change |", "|---|---|---|---|",
        f"| parameters | {report['params_before']:,} | {report['params_after']:,} | "
        f"{100 * (report['params_after'] / report['params_before'] - 1):+.1f}% |",
    ]
    if report.get("kv_cache_bytes_per_token_before"):
        kb, ka = report["kv_cache_bytes_per_token_before"], report["kv_cache_bytes_per_token_after"]
        lines.append(f"| KV cache bytes per token ({report.get('runtime', {}).get('save_dtype', '')}) | {kb:,} | {ka:,} | "
                     f"{100 * (ka / kb - 1):+.1f}% |")
    if "perplexity" in before and "perplexity" in after:
        lines.append(f"| held-out perplexity | {before['perplexity']:.3f} | {after['perplexity']:.3f} | "
                     f"x{after['perplexity'] / before['perplexity']:.3f} |")
    for task, metrics in report["eval"]["lm_eval"]["after"].items():
        for m, v in metrics.items():
            if m.endswith("_stderr") or m == "samples" or not isinstance(v, (int, float)):
                continue
            b = report["eval"]["lm_eval"]["before"].get(task, {}).get(m)
            lines.append(f"| lm-eval {task} / {m} | {_fmt(b)} | {_fmt(v)} | "
                         f"{_fmt(v - b) if isinstance(b, (int, float)) else '-'} |")
    gens = report.get("generations")
    if gens:
        b, a = gens["before"]["repeated_4gram_share"], gens["after"]["repeated_4gram_share"]
        lines.append(f"| repeated {gens['ngram']}-grams in greedy continuations (0 = none, 1 = a loop) | {b:.3f} | "
                     f"{a:.3f} | {a - b:+.3f} |")
    awq = report.get("awq")
    if awq:
        lines.append(f"| safetensors bytes | {awq['fp_safetensors_bytes']:,} (pruned, fp) | "
                     f"{awq['awq_safetensors_bytes']:,} (AWQ) | x{awq['compression_ratio']:.2f} smaller |")
    rt = report["roundtrip"]
    lines += [""]
    sa = report.get("save_as")
    if sa:
        when = "before quantization" if report.get("output_kind") == "awq" else "before saving"
        lines += [f"Saved as {sa['architecture']} (recipe `save_as: mistral`): converted from {sa['converted_from']} "
                  f"{when}, the same computation in a class whose stock config accepts these head counts (max |logit "
                  f"diff| between the two = {sa['max_abs_logit_diff']:.3g}).", ""]
    lines += [f"Round trip: saved, reloaded from disk with {rt['loader']}, max |logit diff| = "
              f"{rt['max_abs_logit_diff']:.3g} ({'ok' if rt['ok'] else 'FAILED'}).", ""]
    lines += _generation_lines(gens)
    if report["gates"]:
        lines += ["## Gates", "", "| gate | limit | value | passed |", "|---|---|---|---|"]
        for k, g in report["gates"].items():
            lines.append(f"| {k} | {_fmt(g['limit'], 4)} | {_fmt(g['value'], 4)} | {'yes' if g['passed'] else 'NO'} |")
        lines.append("")
    lines += ["## Stages", "", "| # | stage | what it did | parameters | perplexity after | seconds |",
              "|---|---|---|---|---|---|"]
    lines += [_stage_line(s) for s in report["stages"]]
    shapes = report["shapes_after"]["per_layer"]
    lines += ["", "## Shapes after", "", "| layer | query heads | KV heads | MLP width |", "|---|---|---|---|"]
    lines += [f"| {i} | {s['num_attention_heads']} | {s['num_key_value_heads']} | {s['intermediate_size']} |"
              for i, s in enumerate(shapes)]
    plots = sorted(report.get("plots", []))
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}](plots/{p})" for p in plots]
    lines += ["", "## How to load", "", _load_snippet(report), "", "## Recipe", "", "```yaml", recipe_text.rstrip(),
              "```", "", "## Versions", "", ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    path.write_text("\n".join(lines), encoding="utf-8")
