"""The study's report, regenerated from the run folder alone (DESIGN 4.4, 5; issue 5).

``write_report(run)`` reads the run's config, training metrics, oracle summaries, router
evaluations and per-token tables, recomputes nothing that needs the model, and writes

    RUN/report/index.html        one self-contained page, figures embedded as data:image/png;base64
    RUN/report/report.md         the Markdown twin, figures as files next to it (figures/*.png)
    RUN/report/results.json      every number the report states, and each finding with its verdict
    RUN/report/difficulty.json   token difficulty summary (analysis/difficulty.py)
    RUN/report/difficulty.parquet  per-token losses and gaps

Deterministic: no timestamps or absolute paths, sorted JSON keys, PNGs without a Software tag,
so the same run folder gives byte-identical files on every regeneration.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np
import torch

from .. import rundir
from ..data.cache import load_tokens
from ..io import atomic_folder, atomic_write_bytes, atomic_write_text
from ..model.model import DuoModel, param_counts
from ..rundir import writing
from ..stats import finite_round
from . import gap, scale, stage1, wallclock
from .difficulty import difficulty_table, reference_k, token_table, write_difficulty
from .figures import render_all, sample_sequence, visible
from .findings import CRITERIA, CRITERIA_VERSION, across_seeds, check_all, counts, criteria_fingerprint
from .rundata import RunData

FIGURE_CAPTIONS = {
    "findings": "Each finding's effect minus its registry threshold, in units of its own standard error (so every "
                "95% t-interval shows on one axis), coloured by its family-adjusted verdict; right of zero is the "
                "paper's direction. The numbers in their own units are in the findings table.",
    "training": "Training loss (random routing) and validation loss under all-big, all-small and random routing, "
                "by step.",
    "ppl_vs_budget": "Perplexity vs big-layer budget k: the oracle (per context policy), the best fixed pattern, "
                     "the best of 100 random patterns, a random pattern, all-small and all-big; routers at their "
                     "realised budget. Top axis: compute relative to all-big.",
    "oracle_usage": "Share of tokens sent to big at each layer (rows, first at the bottom) and position (columns) by "
                    "the oracle at a small, middle and large budget; last panel: share skipped in the skip study.",
    "router_usage": "The same for each trained router, under the oracle at the router's budget (a router that may "
                    "skip: its share skipped too).",
    "router_routes": "Every layer's route (skip, small, big) for every token of the first evaluation sequence, per "
                     "router.",
    "position_budgets": "Budgets that fall or rise along the sequence vs a constant one with the same mean, per "
                        "context and for the sequential oracle; bars: 95% intervals; dots: the per-token prediction "
                        "Σ w_k·oracle@k (under shared/frozen the measured value is that prediction).",
    "token_losses": "Loss of each next token of a validation sequence under all-small, all-big and the oracle at "
                    "k = L/2, and the difficulty gap (all-small minus oracle).",
    "difficulty_ranking": "Tokens ranked by difficulty gap vs by raw all-small loss.",
    "skip_vs_early_exit": "Skip study: which layers the oracle skips, its most chosen patterns, and perplexity of the "
                          "oracle, the best fixed pattern, early exit and a random pattern.",
    "scale": "The study per model size (study.widths, study.train_tokens) against the parameter count: the big-small "
             "gap, the oracle's gain over the out-of-sample fixed@L/2, the share of it the count-matched selection null "
             "and the best label-free oracle recover, the router against the out-of-sample fixed pattern, and "
             "Spearman(raw loss, benefit); 95% t-intervals over sequences.",
}


# ----------------------------------------------------------------------------- numbers


def _r(x, nd: int = 4):
    return finite_round(x, nd)


def model_summary(rd: RunData) -> dict:
    cfg = rd.config
    with torch.device("meta"):  # counts without allocating weights
        params = param_counts(DuoModel(cfg.model))
    m = cfg.model
    return {"preset": cfg.preset, "n_layers": m.n_layers, "d_model": m.d_model, "n_heads": m.n_heads,
            "d_ff_big": m.d_ff_big, "d_ff_small": m.d_ff_small, "vocab_size": m.vocab_size,
            "seq_len": cfg.train.seq_len, "params": params}


def oracle_section(o) -> dict:
    keys = ("k", "candidates", "oracle_ppl", "oracle_ppl_lo", "oracle_ppl_hi", "fixed_ppl", "fixed_ppl_lo", "fixed_ppl_hi",
            "fixed_pattern", "best_of_100_ppl", "best_of_100_ppl_lo", "best_of_100_ppl_hi", "best_of_100_per_token_ppl",
            "random_mean_ppl", "random_mean_ppl_lo", "random_mean_ppl_hi", "oracle_compute", "fixed_compute",
            "fixed_oos_ppl", "fixed_oos_ppl_lo", "fixed_oos_ppl_hi", "best_of_100_oos_ppl", "best_of_100_oos_ppl_lo",
            "best_of_100_oos_ppl_hi", "count_null_ppl", "count_null_ppl_lo", "count_null_ppl_hi", "count_null_n",
            "equal_count_ppl", "equal_count_ppl_lo", "equal_count_ppl_hi")
    s = o.summary
    return {
        "name": o.name, "context": o.context, "reference": s.get("reference"), "tokens": s.get("tokens"),
        "all_big_ppl": _r(s.get("all_big_ppl")), "all_small_ppl": _r(s.get("all_small_ppl")),
        **{k: _r(s.get(k)) for k in ("all_big_ppl_lo", "all_big_ppl_hi", "all_small_ppl_lo", "all_small_ppl_hi")},
        "all_small_compute": _r(s.get("all_small_compute")),
        "budgets": [{**{k: (_r(b.get(k)) if isinstance(b.get(k), float) else b.get(k)) for k in keys},
                     "oracle_minus_fixed": {k: _r(v) for k, v in b["oracle_minus_fixed"].items()}
                     if b.get("oracle_minus_fixed") else None} for b in o.budgets],
        "position_budgets": [{k: (_r(v) if isinstance(v, float) else
                                  {kk: _r(vv) for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in e.items()}
                             for e in s.get("position_budgets") or []],
    }


SMOKE_RATIO = 0.8  # all-big within 20% of the unigram model's perplexity (or worse): a smoke test


def model_quality(rd: RunData) -> dict | None:
    """The trained model (all big) against a unigram model of the training tokens (add-one smoothing),
    on the primary oracle's tokens: how far training got beyond word frequencies."""
    o = rd.primary
    table = o.per_token() if o is not None else None
    if table is None or "target" not in table.column_names:
        return None
    counts_V = np.bincount(np.asarray(load_tokens(rd.run, "train")), minlength=rd.config.model.vocab_size) + 1.0
    tgt_N = table.column("target").to_numpy()
    unigram = math.exp(-float(np.log(counts_V[tgt_N] / counts_V.sum()).mean()))
    ratio = o.summary["all_big_ppl"] / unigram
    return {"unigram_ppl": _r(unigram), "all_big_ppl": _r(o.summary["all_big_ppl"]), "ratio": _r(ratio),
            "smoke_test": bool(ratio >= SMOKE_RATIO)}


def router_rows(rd: RunData) -> list[dict]:
    rows = []
    for r in rd.routers:
        o = r.get("oracle") or {}
        rows.append({
            "name": r["name"], "method": r.get("method"), "options": r.get("options", "SB"), "enforced": r.get("enforced", False),
            "target": _r(r.get("target")), "k": o.get("k", r.get("target_k")),
            "ppl": _r(r.get("ppl")), "ppl_lo": _r(r.get("ppl_lo")), "ppl_hi": _r(r.get("ppl_hi")),
            "big_fraction": _r(r.get("big_fraction")), "skip_fraction": _r(r.get("skip_fraction")),
            "compute": _r(r.get("compute")), "tokens": r.get("tokens"), "layer_profile": r.get("layer_profile"),
            "oracle_ppl": _r(o.get("oracle_ppl")), "fixed_ppl": _r(o.get("fixed_ppl")),
            "best_of_100_ppl": _r(o.get("best_of_100_ppl")), "random_mean_ppl": _r(o.get("random_mean_ppl")),
            "agreement": _r(o.get("agreement")), "pattern_match": _r(o.get("pattern_match")),
            **{key: ({k: _r(v) for k, v in o[key].items()} if o.get(key) else None)
               for key in ("router_minus_oracle", "router_minus_fixed")},
            "oracle_tokens": o.get("tokens"), "heldout_ppl": _r((o.get("heldout") or {}).get("ppl")),
            "heldout_oracle_ppl": _r((o.get("heldout") or {}).get("oracle_ppl")),
            # the router's own evaluation measures its share against the in-sample fixed@k (optimistic); the
            # report's shares are in results["gap"], against the out-of-sample one
            "recovered_vs_in_sample_fixed": o.get("recovered"),
        })
    return rows


def results(rd: RunData, difficulty: dict | None, figures: list[str], findings: list[dict]) -> dict:
    cfg = rd.config
    m = rd.final_metrics
    primary = rd.primary
    skip = rd.skip_study
    return {
        "run": rd.run.name,
        "model": model_summary(rd),
        "data": {"spec": cfg.data.spec, "tokenizer": cfg.data.tokenizer,
                 "train_tokens": rd.data_meta.get("train_tokens"), "val_tokens": rd.data_meta.get("val_tokens")},
        "training": {"steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "seq_len": cfg.train.seq_len,
                     "routing": {"p_big": cfg.routing.p_big, "p_small": cfg.routing.p_small,
                                 "p_skip": cfg.routing.p_skip, "per": cfg.routing.per},
                     "final": {k: _r(v) for k, v in sorted(m.items()) if k.startswith(("train/", "val/"))}},
        "evaluation": {"tokens": primary.summary.get("tokens") if primary else None,
                       "sequences": primary.summary.get("sequences") if primary else None,
                       "text": "whole windows spread over the run's validation split (van der Corput order)",
                       "contexts": list(rd.sweeps)},
        "oracle": [oracle_section(o) for o in rd.sweeps.values()],  # a list: the primary context first
        "skip_study": oracle_section(skip) | {"skips": skip.summary.get("skips"),
                                              "early_exit_share": _r(skip.budgets[0].get("oracle_early_exit_share"))}
        if skip is not None and skip.budgets else None,
        "routers": router_rows(rd),
        "gap": (rows := gap.decomposition(rd)),
        "gain_made_of": gap.made_of(rows, rd.n_layers),
        "criteria": {"version": CRITERIA_VERSION, "fingerprint": criteria_fingerprint(),
                     "criteria": {k: c.as_dict() for k, c in CRITERIA.items()}},
        "sequential": oracle_section(rd.sequential) if rd.sequential is not None else None,
        "null": {"oracle": oracle_section(rd.null.primary)} if rd.null is not None and rd.null.primary else None,
        "model_quality": model_quality(rd),
        **({"wallclock": wallclock.section(rd.bench)} if rd.bench else {}),  # after `duollm bench`
        "difficulty": difficulty,
        "findings": findings,
        "verdicts": counts(findings),
        "seed_of": rd.run.parent.parent.name if rd.run.parent.name == "seeds" else None,  # rundir.seed_dir
        "seeds": across_seeds(rd, findings),
        "figures": figures,
    }


# ----------------------------------------------------------------------------- rendering helpers


def _fmt(x, nd: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return str(x)


def _ci(d: dict, key: str, nd: int = 2) -> str:
    """``d[key]`` with its 95% interval ``d[key + "_lo"]``, ``d[key + "_hi"]``: ``12.34 [11.90, 12.80]``
    (the value alone where there is none)."""
    lo, hi = d.get(f"{key}_lo"), d.get(f"{key}_hi")
    if lo is None or hi is None:
        return _fmt(d.get(key), nd)
    return f"{_fmt(d.get(key), nd)} [{_fmt(lo, nd)}, {_fmt(hi, nd)}]"


def _diff(d: dict | None, nd: int = 2) -> str:
    return "—" if not d else f"{d['diff']:+.{nd}f} [{d['lo']:+.{nd}f}, {d['hi']:+.{nd}f}]"


def _verdict(v) -> str:
    return v or "not tested"


def _effect(e: dict | None, key: str = "value", nd: int = 3) -> str:
    """A finding's effect (or its null, ``key="null"``) with the 95% interval."""
    if not e or e.get(key) is None:
        return "—"
    lo, hi = e.get(f"{key}_lo" if key != "value" else "lo"), e.get(f"{key}_hi" if key != "value" else "hi")
    return f"{e[key]:+.{nd}f} [{_fmt(lo, nd)}, {_fmt(hi, nd)}]"


def _threshold(f: dict) -> str:
    """The shown effect's threshold (a part of a claim may face the other way, e.g. placement at 2L/3)."""
    e, t = f.get("effect") or {}, f.get("threshold") or {}
    d, thr = e.get("direction", t.get("direction")), e.get("threshold", t.get("threshold"))
    if e.get("margin") is not None:  # an equivalence test
        return f"within ±{e['margin']:g}"
    return "—" if thr is None else f"{'>' if d == 1 else '<'} {thr:g}"


def _numbers(d: dict) -> str:
    """Compact one-line rendering of a finding's numbers (nested lists of router rows shortened)."""
    parts = []
    for k, v in d.items():
        if isinstance(v, list):
            v = "; ".join(", ".join(f"{kk}={_fmt(vv)}" for kk, vv in item.items()
                                    if kk in ("router", "verdict", "ppl", "oracle_ppl", "fixed_ppl", "realised_k"))
                          if isinstance(item, dict) else _fmt(item) for item in v)
        elif isinstance(v, dict):
            v = ", ".join(f"{kk}={_fmt(vv) if not isinstance(vv, dict) else _numbers(vv)}" for kk, vv in v.items())
        else:
            v = _fmt(v, 4 if isinstance(v, float) and abs(v) < 10 else 2)
        parts.append(f"{k}: {v}")
    return "; ".join(parts)


def tables(res: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table, shared by the HTML and the Markdown."""
    out = []
    m = res["model"]
    p = m["params"]
    setup = [
        ["model", f"{m['preset']} preset: {m['n_layers']} layers, width {m['d_model']}, {m['n_heads']} heads, "
                  f"FFN big {m['d_ff_big']} / small {m['d_ff_small']}, vocab {m['vocab_size']}, context {m['seq_len']}"],
        ["parameters", f"{p['total']:,} (big FFNs {p['big_ffn']:,}, small FFNs {p['small_ffn']:,}, "
                       f"attention {p['attention']:,}, embeddings {p['embeddings']:,})"],
        ["data", f"{res['data']['spec']} ({_fmt(res['data']['train_tokens'])} training / "
                 f"{_fmt(res['data']['val_tokens'])} validation tokens, tokenizer {res['data']['tokenizer']})"],
        ["training", f"{res['training']['steps']:,} steps x {res['training']['batch_size']} sequences x "
                     f"{res['training']['seq_len']} tokens, random routing p(big) = {res['training']['routing']['p_big']}"
                     + "".join(f"; {k} {_fmt(v, 3)}" for k, v in res["training"]["final"].items())],
        ["evaluation", f"{_fmt(res['evaluation']['tokens'])} tokens of {res['evaluation']['text']}"],
        ["context policies", ", ".join(res["evaluation"]["contexts"]) or "—"],
    ]
    out.append(("Setup", ["", ""], setup))
    out.append(("Findings of the paper, each tested against its own null (H0) with the criterion frozen in the registry "
                f"(version {res['criteria']['version']}); effects with 95% t-intervals over sequences; verdicts corrected "
                "across the study's findings (Holm); MDE: the smallest distance from the threshold detected with 80% power",
                ["finding", "context", "verdict (Holm)", "effect [95%]", "threshold", "p (Holm)", "unadjusted", "MDE",
                 "as the paper measured it [95%]", "H0", "power / limits"],
                [[f["claim"], f["context"] or "—", _verdict(f["verdict"]), _effect(f["effect"]),
                  _threshold(f), _fmt(f["p_adjusted"], 4), _verdict(f["unadjusted_verdict"]),
                  _fmt(f["mde"], 4), _effect(f["numbers"].get("as_paper")), f["h0"],
                  "; ".join(x for x in (f["power"], f["why"]) if x) or "—"]
                 for f in res["findings"]]))
    out.append((f"The registry's criteria (version {res['criteria']['version']}, fingerprint {res['criteria']['fingerprint']}): "
                "fixed before results are seen, printed here so a reader can check them",
                ["finding", "statistic", "threshold", "direction", "smallest effect of interest", "other"],
                [[k, c["statistic"], _fmt(c["threshold"], 3), "above" if c["direction"] == 1 else "below",
                  _fmt(c["sesoi"], 3), ", ".join(f"{kk} {_fmt(vv, 3)}" for kk, vv in c.items()
                                                  if kk not in ("claim", "h0", "statistic", "threshold", "direction", "sesoi"))
                  or "—"] for k, c in res["criteria"]["criteria"].items()]))
    out.append(("Details of each finding (as the registry's check computed them)", ["finding", "context", "numbers"],
                [[f["id"], f["context"] or "—", _numbers(f["numbers"])] for f in res["findings"]]))
    for o in res["oracle"]:
        ctx = o["context"]
        rows = [[str(b["k"]), _fmt(b["candidates"]), _ci(b, "oracle_ppl"), _ci(b, "fixed_oos_ppl"), _ci(b, "fixed_ppl"),
                 _diff(b.get("oracle_minus_fixed")), b["fixed_pattern"] or "—", _ci(b, "count_null_ppl"),
                 ", ".join(f"n={n}: {_fmt(v)}" for n, v in (b.get("equal_count_ppl") or {}).items()) or "—",
                 _ci(b, "best_of_100_oos_ppl"), _ci(b, "best_of_100_ppl"), _fmt(b["best_of_100_per_token_ppl"]),
                 _ci(b, "random_mean_ppl"), _fmt(b["oracle_compute"], 3)]
                for b in o["budgets"]]
        ref = f", context tokens {o['reference']}" if o["reference"] else ""
        small = "all-small (scored token only)" if o["reference"] else "all-small"
        big, small_ppl = _ci(o, "all_big_ppl"), _ci(o, "all_small_ppl")
        out.append((f"Oracle, {ctx} context{ref}: all-big {big}, {small} {small_ppl} "
                    f"(compute {_fmt(o['all_small_compute'], 3)}), {_fmt(o['tokens'])} tokens",
                    ["k", "candidates", "oracle [95% interval]", "fixed, out of sample [95%]",
                     "fixed, in sample (optimistic) [95%]", "oracle − fixed in sample [paired 95%]", "fixed pattern (in sample)",
                     "count-matched null [95%]", "oracle at equal count", "best of 100, out of sample [95%]",
                     "best of 100, in sample [95%]", "best of 100 per token", "random [95%]", "compute"], rows))
        out += position_table(o, f"{ctx} context")
    out += gap.table(res.get("gap") or [])
    if res.get("sequential"):
        q = res["sequential"]
        out.append((f"Sequential oracle (each token chooses given its predecessors' own choices): all-big "
                    f"{_ci(q, 'all_big_ppl')}, {_fmt(q['tokens'])} tokens",
                    ["k", "candidates", "oracle [95% interval]", "compute"],
                    [[str(b["k"]), _fmt(b["candidates"]), _ci(b, "oracle_ppl"), _fmt(b["oracle_compute"], 3)]
                     for b in q["budgets"]]))
        out += position_table(q, "sequential oracle")
    n = res.get("null")
    if n and res["oracle"]:
        real, null = res["oracle"][0], n["oracle"]
        by_k = {b["k"]: b for b in null["budgets"]}
        gain = lambda b, o: None if b.get("oracle_ppl") is None else 1.0 - b["oracle_ppl"] / o["all_big_ppl"]
        out.append((f"Null control: the model at initialisation on the same tokens ({null['context']} context): "
                    f"all-big {_ci(null, 'all_big_ppl')}, all-small {_ci(null, 'all_small_ppl')}",
                    ["k", "oracle, null [95%]", "oracle gain over all-big, null", "oracle gain over all-big, trained"],
                    [[str(b["k"]), _ci(by_k[b["k"]], "oracle_ppl"), _fmt(gain(by_k[b["k"]], null), 3),
                      _fmt(gain(b, real), 3)] for b in real["budgets"] if b["k"] in by_k]))
    sd = res.get("seeds")
    if sd:
        out.append((f"Across {len(sd['seeds'])} training seeds ({', '.join(map(str, sd['seeds']))}; all-big perplexity "
                    + ", ".join(_fmt(m["all_big_ppl"]) for m in sd["models"]) + ")",
                    ["finding", "context", "effect per seed [95%]", "mean ± sd over seeds", "verdicts"],
                    [[r["claim"], r["context"] or "—", "; ".join(_effect(e) for e in r["effects"]),
                      "—" if r["mean"] is None else f"{r['mean']:+.3f} ± {_fmt(r['sd'], 3)}",
                      ", ".join(v or "not tested" for v in r["verdicts"])] for r in sd["findings"]]))
    s = res["skip_study"]
    if s:
        b = s["budgets"][0]
        out.append((f"Skip study: big or skip, exactly {s['skips']} skipped layers ({s['context']} context)",
                    ["oracle", "fixed", "fixed pattern", "best of 100", "random", "tokens taking early exit"],
                    [[_fmt(b["oracle_ppl"]), _fmt(b["fixed_ppl"]), b["fixed_pattern"] or "—", _fmt(b["best_of_100_ppl"]),
                      _fmt(b["random_mean_ppl"]), _fmt(s["early_exit_share"], 3)]]))
    if res["routers"]:
        out.append(("Routers (hard routing) next to the oracle at their budget",
                    ["router", "k", "ppl [95% interval]", "big", "oracle", "router − oracle [paired 95%]", "fixed",
                     "router − fixed [paired 95%]", "best of 100", "random", "agreement", "layer profile", "tokens"],
                    [[r["name"], _fmt(r["k"]), _ci(r, "ppl"),
                      _fmt(r["big_fraction"], 3), _fmt(r["oracle_ppl"]), _diff(r.get("router_minus_oracle")),
                      _fmt(r["fixed_ppl"]), _diff(r.get("router_minus_fixed")), _fmt(r["best_of_100_ppl"]),
                      _fmt(r["random_mean_ppl"]), _fmt(r["agreement"], 3), r["layer_profile"] or "—", _fmt(r["tokens"])]
                     for r in res["routers"]]))
    d = res["difficulty"]
    if d:
        out.append((f"Token difficulty (gap = all-small loss - oracle loss at k={d['k_ref']}, {d['context']} context)",
                    ["measure", "value"],
                    [["Spearman(all-small loss, gap)", _fmt(d["spearman_small_loss_vs_gap"], 3)],
                     ["Spearman(all-small loss, all-small - all-big)", _fmt(d["spearman_small_loss_vs_big_gain"], 3)],
                     ["high-loss tokens (top quarter) gaining little (gap below median)", _fmt(d["high_loss_low_gain_share"], 3)],
                     ["top tenth by loss also in top tenth by gap", _fmt(d["top_decile_overlap"], 3)],
                     ["mean gap by loss quartile (low to high)", ", ".join(_fmt(x, 3) for x in d["mean_gap_by_loss_quartile"])],
                     ["mean gain of all-big over all-small (nats)", _fmt(d["mean_gain_big"], 4)]]))
        for key, title in (("top_by_gap", "highest gap"), ("top_by_loss", "highest all-small loss")):
            out.append((f"Tokens with the {title} (context [target])",
                        ["text", "loss small", "loss big", "loss oracle", "gap", "rank by loss", "rank by gap"],
                        [[visible(t["text"]), _fmt(t["loss_small"]), _fmt(t["loss_big"]), _fmt(t["loss_oracle"]), _fmt(t["gap"]),
                          str(t["loss_rank"]), str(t["gap_rank"])] for t in d[key]]))
    return (out + wallclock.tables(res.get("wallclock")) + stage1.tables(res.get("stage1"))
            + scale.tables(res.get("scale")))


def position_table(o: dict, label: str) -> list:
    """The position-varying budgets of one oracle, the measured score beside the per-token prediction."""
    if not o["position_budgets"]:
        return []
    return [(f"Position-varying budgets, {label} (predicted = exp(Σ_k w_k · mean oracle loss at constant k))",
             ["schedule", "k along the sequence", "mean k", "oracle ppl [95%]", "predicted", "minus constant [paired 95%]",
              "compute"],
             [[e["name"], e["schedule"], _fmt(e["mean_budget"]), _ci(e, "oracle_ppl"), _fmt(e.get("predicted_ppl")),
               _diff(e.get("minus_constant")), _fmt(e["compute"], 3)] for e in o["position_budgets"]])]


def coloured_tokens_html(rd: RunData) -> str:
    """The sample sequence as text, each token's background coloured by its loss (one line per routing)."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize, TwoSlopeNorm, to_hex

    tab = token_table(rd)
    if tab is None:
        return ""
    k = reference_k(tab["ks"], rd.n_layers)
    rows = sample_sequence(tab, 96)
    texts = rd.token_text(tab["target_N"][rows])
    series = [("all small", tab["loss_small_N"][rows]), ("all big", tab["loss_big_N"][rows]),
              (f"oracle k={k}", tab["oracle_JN"][tab["ks"].index(k)][rows])]
    gap = series[0][1] - series[2][1]
    lo = min(float(v.min()) for _, v in series)
    hi = max(float(v.max()) for _, v in series)
    norm = Normalize(lo, hi if hi > lo else lo + 1)
    lim = max(float(np.abs(gap).max()), 1e-6)
    gnorm = TwoSlopeNorm(0.0, -lim, lim)
    lines = []
    for name, vals, cmap, nm in [(n, v, "magma_r", norm) for n, v in series] + [("gap", gap, "RdBu", gnorm)]:
        spans = []
        for text, v in zip(texts, vals):
            rgba = colormaps[cmap](nm(float(v)))
            fg = "#000" if 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.55 else "#fff"
            shown = html.escape(text.replace("\n", "\u21b5"))
            spans.append(f'<span style="background:{to_hex(rgba)};color:{fg}" title="{float(v):.3f}">{shown}</span>')
        lines.append(f'<div class="toks"><b>{html.escape(name)}</b> {"".join(spans)}</div>')
    return (f"<p>Next-token loss on validation sequence {int(tab['sequence_N'][rows[0]])} (darker = higher loss, "
            f"{lo:.2f} to {hi:.2f} nats; gap: blue = the oracle gains, red = it loses; hover for values).</p>\n"
            + "\n".join(lines))


def headline(res: dict) -> str:
    n = res["verdicts"]
    null = ("" if res.get("null") else
            "; the router findings' untrained-model null is in the parent study's report" if res.get("seed_of") else
            "; WITHOUT the null control (study.null=false): the router findings cannot reproduce")
    text = (f"Of {n['tested']} tested findings, {n['reproduced']} reproduced, {n['contradicted']} contradicted, "
            f"{n['inconclusive']} inconclusive (each against its own null, 95% t-intervals over "
            f"{res['evaluation'].get('sequences') or '?'} sequences, Holm-corrected across the findings{null})")
    made_of = res.get("gain_made_of")
    return text + (f". {made_of.rstrip('.')}" if made_of else "")


def smoke_banner(res: dict) -> str | None:
    """The warning a barely trained run carries (DESIGN 4.4a), or None."""
    q = res.get("model_quality")
    if not q or not q["smoke_test"]:
        return None
    return (f"SMOKE TEST: the model's all-big perplexity ({_fmt(q['all_big_ppl'])}) is {_fmt(q['ratio'], 2)}x that of a "
            f"unigram model of its training tokens ({_fmt(q['unigram_ppl'])}); a model this barely trained tests the "
            f"pipeline, and its findings say nothing about the paper")


# ----------------------------------------------------------------------------- HTML and Markdown

CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.88em}td,th{border:1px solid #ccc;padding:3px 7px;
vertical-align:top}th{background:#f3f3f3}img{max-width:100%}figure{margin:1em 0 2em}figcaption{font-size:0.9em;color:#555}
.toks{font-family:monospace;white-space:pre-wrap;line-height:1.7;margin:0.3em 0}.toks b{display:inline-block;width:7em}
.reproduced{color:#1a7f37;font-weight:600}.contradicted{color:#b42318;font-weight:600}.inconclusive{color:#9a6700}
.not-tested{color:#777}.banner{color:#b42318;font-weight:600}"""


def render_html(res: dict, pngs: dict[str, bytes], tokens_html: str) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>duollm study: {e(res['run'])}</title><style>{CSS}</style></head><body>",
             f"<h1>Duo-LLM study: {e(res['run'])}</h1>",
             f"<p>{e(headline(res))}. Model {e(res['model']['preset'])}, data {e(res['data']['spec'])}, "
             f"{_fmt(res['evaluation']['tokens'])} evaluation tokens, context policies "
             f"{e(', '.join(res['evaluation']['contexts']) or '—')}. Method: Alizadeh et al., arXiv 2410.10846.</p>"]
    banner = smoke_banner(res)
    if banner:
        parts.append(f'<p class="banner">{e(banner)}.</p>')
    for title, header, rows in tables(res):
        parts.append(f"<h2>{e(title)}</h2><table>")
        if any(header):
            parts.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        for row in rows:
            cells = []
            for cell in row:
                cls = {"reproduced": "reproduced", "contradicted": "contradicted", "inconclusive": "inconclusive",
                       "not tested": "not-tested"}.get(cell)
                cells.append(f'<td class="{cls}">{e(cell)}</td>' if cls else f"<td>{e(cell)}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>")
    if tokens_html:
        parts.append("<h2>Per-token loss on real text</h2>" + tokens_html)
    parts.append("<h2>Figures</h2>")
    for name, png in pngs.items():
        b64 = base64.b64encode(png).decode("ascii")
        parts.append(f'<figure id="{name}"><img alt="{name}" src="data:image/png;base64,{b64}">'
                     f"<figcaption>{e(FIGURE_CAPTIONS.get(name, name))}</figcaption></figure>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


MD_SPECIAL = "\\`*_[]<>#|"


def _md_cell(s: str) -> str:
    """A table cell's text with Markdown's special characters escaped (token texts hold any of them)."""
    return "".join("\\" + c if c in MD_SPECIAL else c for c in s.replace("\n", "\u21b5"))


def render_markdown(res: dict, pngs: dict[str, bytes]) -> str:
    lines = [f"# Duo-LLM study: {res['run']}", "",
             f"{headline(res)}. Model {res['model']['preset']}, data {_md_cell(res['data']['spec'])}, "
             f"{_fmt(res['evaluation']['tokens'])} evaluation tokens, context policies "
             f"{', '.join(res['evaluation']['contexts']) or '—'}. Method: Alizadeh et al., arXiv 2410.10846.", ""]
    banner = smoke_banner(res)
    if banner:
        lines += [f"**{banner}.**", ""]
    for title, header, rows in tables(res):
        lines += [f"## {title}", ""]
        lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
        lines.append("")
    lines += ["## Figures", ""]
    for name in pngs:
        lines += [f"![{name}](figures/{name}.png)", "", f"*{FIGURE_CAPTIONS.get(name, name)}*", ""]
    return "\n".join(lines)


def write_report(run_dir) -> Path:
    """Regenerate ``RUN/report/`` from the run folder (no model computation); returns index.html's path."""
    with writing(Path(run_dir)):
        return _write_report(Path(run_dir))


def _write_report(run_dir: Path) -> Path:
    """Everything is computed first, then written into a folder of its own and swapped in whole: a report
    that fails leaves the old one as it was, and a kill at any moment leaves the old one or the new one."""
    rd = RunData(run_dir)
    difficulty, difficulty_columns = difficulty_table(rd)
    ev = stage1.load(rd.run)  # the paper's Fig. 8, when the study ran it (study.stage1)
    findings = [f.as_dict() for f in check_all(rd, extra=stage1.findings(ev))]
    s1 = stage1.section(ev)
    pngs = render_all(rd, difficulty, findings) | stage1.figure(s1)
    res = results(rd, difficulty, list(pngs), findings) | ({"stage1": s1} if s1 else {})
    sc = scale.section(rd, res)  # the other sizes' own reports beside this run's numbers (study.widths)
    if sc:
        pngs |= scale.figure(sc)
        res |= {"scale": sc, "figures": list(pngs)}
    files = {rundir.REPORT_RESULTS: json.dumps(res, indent=2, sort_keys=True) + "\n",
             rundir.REPORT_MD: render_markdown(res, pngs),
             rundir.REPORT_HTML: render_html(res, pngs, coloured_tokens_html(rd))}
    with atomic_folder(rundir.report_dir(rd.run)) as tmp:
        for name, png in pngs.items():
            atomic_write_bytes(tmp / rundir.REPORT_FIGURES / f"{name}.png", png)
        if difficulty is not None:
            write_difficulty(tmp, difficulty, difficulty_columns)
        for name, text in files.items():
            atomic_write_text(tmp / name, text)
    return rundir.report_html(rd.run)
