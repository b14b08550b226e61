"""Least-squares repair on SmolLM2-135M: no refit, a refit at one damping, and the held-out choice, side by side.

With 2,048 calibration tokens (8 x 256) a refit of ~1,000 inputs can reproduce the calibration tokens and lose on
everything else: before the held-out choice, repairing 15% of the MLP channels raised held-out perplexity
(activation: 47.94 unrepaired, 53.82 repaired at reconstruct_damp 0.01). For each setting this runs, on the same
model, calibration and evaluation as benchmarks/real.py:
- `none`: reconstruct: none;
- `LS fixed 0.01`: reconstruct_holdout: 0, every projection refitted at reconstruct_damp 0.01 (the damping pulls
  toward the sliced weight; at 0.01 this is within rounding of the earlier refit toward 0);
- `LS fixed 1.0`: the same at damping 1.0 (the best single damping on the first setting);
- `LS held-out` (the default): 2 of the 8 windows held out, each projection takes the damping (0.01, 0.1, 1, 10)
  or no refit that reproduces the held-out tokens best, then is refitted on all 8 windows;
and FLAP (benchmarks/peers/flap.py) at the setting's budget for reference.

    python -m benchmarks.repair            # about 40 minutes on 2 cores; results/repair.json and repair.md
    python -m benchmarks.repair --only "^MLP 5%"   # resumes: rows already in results/repair.json are kept
"""

from __future__ import annotations

from benchmarks.common import RESULTS, table
from benchmarks.real import FLAP_FRACTION, Bench, flap_row, heads, mlp, run_rows

JSON = RESULTS / "repair.json"

# (setting, budget, stages builder(reconstruct fields) -> stage list)
SETTINGS = [
    ("MLP 15% activation uniform", "15%", lambda r: [dict(mlp(1152, "activation"), **r)]),
    ("MLP 15% taylor uniform", "15%", lambda r: [dict(mlp(1152, "taylor"), **r)]),
    ("MLP 25% taylor uniform (the quick start)", "25%", lambda r: [dict(mlp(896, "taylor"), **r)]),
    ("MLP 25% taylor global", "25%", lambda r: [dict(mlp(896, "taylor", alloc="global"), **r)]),
    ("query heads + MLP 25% activation global", "25%",
     lambda r: [dict(heads({"keep_q_per_kv": 2}, "activation", alloc="global"), **r),
                dict(mlp(1024, "activation", alloc="global"), **r)]),
    ("query heads 5% taylor uniform", "5%", lambda r: [dict(heads({"keep_q_per_kv": 2}, "taylor"), **r)]),
    ("MLP 5% taylor global", "5%", lambda r: [dict(mlp(1408, "taylor", alloc="global"), **r)]),
    ("MLP 5% activation uniform", "5%", lambda r: [dict(mlp(1408, "activation"), **r)]),
]
VARIANTS = {
    "none": {"reconstruct": "none"},
    "LS fixed 0.01": {"reconstruct": "least_squares", "reconstruct_holdout": 0, "reconstruct_damp": 0.01},
    "LS fixed 1.0": {"reconstruct": "least_squares", "reconstruct_holdout": 0, "reconstruct_damp": 1.0},
    "LS held-out": {"reconstruct": "least_squares"},
}


def jobs(b: Bench) -> list:
    """(key, budget, build(model) -> (model, extra)): every setting under every variant, then FLAP per budget."""
    out = [(f"{s}|{v}", bud, lambda m, f=fn, r=rec: (b.gq(m, f(r)), {})) for s, bud, fn in SETTINGS
           for v, rec in VARIANTS.items()]
    out += [(f"FLAP {bud}|FLAP", bud, lambda m, bud=bud: (flap_row(FLAP_FRACTION[bud])(b, m), {}))
            for bud in ("15%", "25%", "5%")]
    return out


def main() -> None:
    run_rows("repair", JSON, jobs, render, "run only rows whose key ('setting|variant') matches this regular "
             "expression (the others are kept from results/repair.json)")


def render(res: dict) -> str:
    def ppl(key: str):
        return res["rows"].get(key, {}).get("ppl", "not run")

    rows = []
    for s, bud, _ in SETTINGS:
        removed = res["rows"].get(f"{s}|none", {}).get("removed")
        rows.append([s, f"{100 * removed:.1f}%" if removed is not None else "-",
                     *[ppl(f"{s}|{v}") for v in VARIANTS], ppl(f"FLAP {bud}|FLAP")])
    return (f"# Least-squares repair: held-out choice vs fixed damping (SmolLM2-135M, dense {res['dense']:.2f})\n\n"
            "Held-out perplexity (4,096 pydoc validation tokens, 256-token windows); calibration 8 x 256 tokens; "
            "`python -m benchmarks.repair`.\n\n"
            + table(["setting", "removed", *VARIANTS, "FLAP (same budget)"], rows))


if __name__ == "__main__":
    main()
