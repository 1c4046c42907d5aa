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
from ..model.routing import BIG
from ..rundir import writing
from ..stats import finite_round
from . import gap, scale, stage1, wallclock
from .difficulty import difficulty_table, reference_k, token_table, write_difficulty
from .explorer import explorer_data, explorer_html
from .figures import render_all, sample_sequence, visible
from .findings import CRITERIA, CRITERIA_VERSION, across_seeds, check_all, counts, criteria_fingerprint
from .page import Section, Table, render_page
from .rundata import RunData, reference_budgets

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
    "router_routes": "Every layer's route (skip, small, big) for the first 48 tokens of the first evaluation sequence, "
                     "per router, under the tokens' text (paper fig. 7).",
    "router_training": "How each router trained: its training loss by step, one panel per method (the methods' losses "
                       "have their own units), and the DAgger routers' held-out language-model loss by round (start: "
                       "the fixed pattern they begin from; the best round is kept).",
    "stage1": "Stage 1 (paper Fig. 8): perplexity, top-1 and multiple-choice accuracy against compute for Duo and the "
              "dense models, with 95% intervals; the Fig. 8c bars.",
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


def usage_by_layer(rd: RunData) -> dict | None:
    """The primary oracle's share of tokens taking big at each layer (mean over positions), at the small, middle
    and large reference budgets (the heatmaps' numbers)."""
    o = rd.primary
    usage_JRLT = o.usage_JRLT() if o is not None else None
    if usage_JRLT is None:
        return None
    return {str(k): _r(usage_JRLT[o.ks.index(k), BIG].mean(-1).tolist(), 4)
            for k in reference_budgets(rd.n_layers).values() if k in o.ks}


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
        "oracle_usage_by_layer": usage_by_layer(rd),
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


def _number_rows(fid: str, context: str, numbers: dict) -> list[list[str]]:
    """A finding's numbers, one per row in proper columns: finding, quantity, value, 95% interval."""
    rows = []

    def walk(prefix: str, v) -> None:
        if isinstance(v, dict) and "value" in v and not any(isinstance(x, dict) for x in v.values()):
            lo, hi = v.get("lo"), v.get("hi")
            rows.append([fid, context, prefix, _fmt(v["value"], 4),
                         "—" if lo is None or hi is None else f"[{_fmt(lo, 4)}, {_fmt(hi, 4)}]"])
        elif isinstance(v, dict):
            for kk, vv in v.items():
                walk(f"{prefix}.{kk}" if prefix else str(kk), vv)
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, item in enumerate(v):
                walk(f"{prefix}[{item.get('router', item.get('name', i))}]", {kk: vv for kk, vv in item.items()
                                                                               if kk not in ("router", "name")})
        elif isinstance(v, list):
            rows.append([fid, context, prefix, ", ".join(_fmt(x, 4) for x in v), "—"])
        else:
            rows.append([fid, context, prefix, _fmt(v, 4 if isinstance(v, float) and abs(v) < 10 else 2), "—"])

    walk("", numbers)
    return rows


def summary_table(res: dict) -> Table | None:
    """The page's first table: one line per finding (claim, effect [interval], verdict, minimum detectable effect)."""
    if not res["findings"]:
        return None
    return Table(f"Verdicts: {res['verdicts']['tested']} findings of the paper, each against its own null, "
                 "Holm-corrected across them (details and criteria below)",
                 ["claim", "context", "effect [95%]", "threshold", "verdict", "MDE"],
                 [[f["claim"], f["context"] or "—", _effect(f["effect"]), _threshold(f),
                   _verdict(f["verdict"]) + (f" ({f['power'].split(':')[0]})" if f["verdict"] == "inconclusive"
                                             and f.get("power") else ""),
                   _fmt(f["mde"], 4)] for f in res["findings"]])


def _budget_reading(res: dict) -> str:
    if not res["oracle"]:
        return ""
    o = res["oracle"][0]
    mid = min(o["budgets"], key=lambda b: abs(b["k"] - res["model"]["n_layers"] / 2))
    fixed = mid.get("fixed_oos_ppl") or mid.get("fixed_ppl")
    return (f"How good per-token routing can get at each budget. At k = {mid['k']} the oracle reaches perplexity "
            f"{_fmt(mid['oracle_ppl'])} against {_fmt(fixed)} for the best fixed pattern chosen out of sample; all-big "
            f"is {_fmt(o['all_big_ppl'])}, all-small {_fmt(o['all_small_ppl'])}. The count-matched null shows how much "
            "of the oracle's edge is selection among as many sub-networks at one fixed compute.")


def sections(res: dict, tokens_html: str = "", explorer: str = "") -> list[Section]:
    """The report's sections in reading order, each with its figures beside its tables (HTML and Markdown)."""
    m, p = res["model"], res["model"]["params"]
    out = []
    n = res["verdicts"]
    out.append(Section(
        "findings", "Findings", f"{n['tested']} claims of the paper, each tested against the null its claim needs with "
        f"a criterion frozen in the registry before any result was seen: {n['reproduced']} reproduced, {n['contradicted']} "
        f"contradicted, {n['inconclusive']} inconclusive. An inconclusive verdict says whether the run could have detected "
        "the smallest effect of interest (powered) or not (underpowered).", ["findings"],
        [Table("Findings, each against its own null (H0) with its registry criterion (version "
               f"{res['criteria']['version']}); verdicts Holm-corrected across the study's findings; MDE: the smallest "
               "distance from the threshold detected with 80% power",
               ["finding", "context", "verdict (Holm)", "effect [95%]", "threshold", "p (Holm)", "unadjusted", "MDE",
                "as the paper measured it [95%]", "H0", "power / limits"],
               [[f["claim"], f["context"] or "—", _verdict(f["verdict"]), _effect(f["effect"]), _threshold(f),
                 _fmt(f["p_adjusted"], 4), _verdict(f["unadjusted_verdict"]), _fmt(f["mde"], 4),
                 _effect(f["numbers"].get("as_paper")), f["h0"], "; ".join(x for x in (f["power"], f["why"]) if x) or "—"]
                for f in res["findings"]]),
         Table(f"The registry's criteria (version {res['criteria']['version']}, fingerprint "
               f"{res['criteria']['fingerprint']}), fixed before results are seen",
               ["finding", "statistic", "threshold", "direction", "smallest effect of interest", "other"],
               [[k, c["statistic"], _fmt(c["threshold"], 3), "above" if c["direction"] == 1 else "below",
                 _fmt(c["sesoi"], 3), ", ".join(f"{kk} {_fmt(vv, 3)}" for kk, vv in c.items()
                                                 if kk not in ("claim", "h0", "statistic", "threshold", "direction", "sesoi"))
                 or "—"] for k, c in res["criteria"]["criteria"].items()]),
         Table("Every number each finding's check computed", ["finding", "context", "quantity", "value", "[95%]"],
               [row for f in res["findings"] for row in _number_rows(f["id"], f["context"] or "—", f["numbers"])])]))
    setup = [
        ["model", f"{m['preset']} preset: {m['n_layers']} layers, width {m['d_model']}, {m['n_heads']} heads, "
                  f"FFN big {m['d_ff_big']} / small {m['d_ff_small']}, vocab {m['vocab_size']}, context {m['seq_len']}"],
        ["parameters", f"{p['total']:,} (big FFNs {p['big_ffn']:,}, small FFNs {p['small_ffn']:,}, "
                       f"attention {p['attention']:,}, embeddings {p['embeddings']:,})"],
        ["data", f"{res['data']['spec']} ({_fmt(res['data']['train_tokens'])} training / "
                 f"{_fmt(res['data']['val_tokens'])} validation tokens, tokenizer {res['data']['tokenizer']})"],
        ["training", f"{res['training']['steps']:,} steps x {res['training']['batch_size']} sequences x "
                     f"{res['training']['seq_len']} tokens, random routing p(big) = {res['training']['routing']['p_big']}"],
        *[[k, _fmt(v, 3)] for k, v in res["training"]["final"].items()],
        ["evaluation", f"{_fmt(res['evaluation']['tokens'])} tokens of {res['evaluation']['text']}"],
        ["context policies", ", ".join(res["evaluation"]["contexts"]) or "—"],
    ]
    out.append(Section("training", "Model and training", "The model every later stage freezes, trained with random "
                       "routing (paper section 3.1) so that every pattern of big and small FFNs is a working network.",
                       ["training"], [Table("Setup and final training metrics", ["", ""], setup)]))
    budget_tables, counts = [], _equal_counts(res)
    for o in res["oracle"]:
        ctx = o["context"]
        rows = [[str(b["k"]), _fmt(b["candidates"]), _ci(b, "oracle_ppl"), _ci(b, "fixed_oos_ppl"), _ci(b, "fixed_ppl"),
                 _diff(b.get("oracle_minus_fixed")), b["fixed_pattern"] or "—", _ci(b, "count_null_ppl"),
                 *[_fmt((b.get("equal_count_ppl") or {}).get(str(c))) for c in counts],
                 _ci(b, "best_of_100_oos_ppl"), _ci(b, "best_of_100_ppl"), _fmt(b["best_of_100_per_token_ppl"]),
                 _ci(b, "random_mean_ppl"), _fmt(b["oracle_compute"], 3)] for b in o["budgets"]]
        ref = f", context tokens {o['reference']}" if o["reference"] else ""
        small = "all-small (scored token only)" if o["reference"] else "all-small"
        budget_tables.append(Table(
            f"Oracle, {ctx} context{ref}: all-big {_ci(o, 'all_big_ppl')}, {small} {_ci(o, 'all_small_ppl')} "
            f"(compute {_fmt(o['all_small_compute'], 3)}), {_fmt(o['tokens'])} tokens",
            ["k", "candidates", "oracle [95%]", "fixed, out of sample [95%]", "fixed, in sample (optimistic) [95%]",
             "oracle − fixed in sample [paired 95%]", "fixed pattern (in sample)", "count-matched null [95%]",
             *[f"oracle at equal count {c}" for c in counts], "best of 100, out of sample [95%]",
             "best of 100, in sample [95%]", "best of 100 per token", "random [95%]", "compute"], rows))
    out.append(Section("budget", "Perplexity against budget", _budget_reading(res), ["ppl_vs_budget"], budget_tables))
    usage = res.get("oracle_usage_by_layer") or {}
    out.append(Section(
        "usage", "Where the oracle spends its big layers", "Per layer and position, the share of tokens the oracle sends "
        "to the big FFN at a small, middle and large budget (paper figs. 3-5); the table gives the per-layer means.",
        ["oracle_usage"], [Table("Share of tokens taking big, per layer (first layer first)",
                                 ["layer", *[f"k = {k}" for k in usage]],
                                 [[str(i + 1), *[_fmt(v[i], 3) for v in usage.values()]]
                                  for i in range(len(next(iter(usage.values()))))])] if usage else []))
    out.append(Section("gap", "The oracle's gain, decomposed",
                       res.get("gain_made_of") or "", [], [Table(*t) for t in gap.table(res.get("gap") or [])]))
    router_tables = []
    if res["routers"]:
        router_tables.append(Table(
            "Routers (hard routing) next to the oracle at their budget",
            ["router", "method", "k", "ppl [95%]", "big", "compute", "oracle", "router − oracle [paired 95%]",
             "fixed (in sample)", "router − fixed [paired 95%]", "best of 100", "random", "agreement", "layer profile",
             "tokens"],
            [[r["name"], r["method"] or "—", _fmt(r["k"]), _ci(r, "ppl"), _fmt(r["big_fraction"], 3), _fmt(r["compute"], 3),
              _fmt(r["oracle_ppl"]), _diff(r.get("router_minus_oracle")), _fmt(r["fixed_ppl"]),
              _diff(r.get("router_minus_fixed")), _fmt(r["best_of_100_ppl"]), _fmt(r["random_mean_ppl"]),
              _fmt(r["agreement"], 3), r["layer_profile"] or "—", _fmt(r["tokens"])] for r in res["routers"]]))
    out.append(Section("routers", "Trained routers", "Routers trained on the frozen model (paper section 3.3 and the "
                       "methods beyond it), evaluated at hard routing; their shares of the oracle's gain are in the "
                       "decomposition above. The route map shows each router's route at every layer for the first "
                       "tokens of a sequence, under their text; the curves show how each trained.",
                       ["router_usage", "router_routes", "router_training"], router_tables))
    pos = []
    for o in res["oracle"]:
        pos += [Table(*t) for t in position_table(o, f"{o['context']} context")]
    if res.get("sequential"):
        q = res["sequential"]
        pos.append(Table(f"Sequential oracle (each token chooses given its predecessors' own choices): all-big "
                         f"{_ci(q, 'all_big_ppl')}, {_fmt(q['tokens'])} tokens", ["k", "candidates", "oracle [95%]", "compute"],
                         [[str(b["k"]), _fmt(b["candidates"]), _ci(b, "oracle_ppl"), _fmt(b["oracle_compute"], 3)]
                          for b in q["budgets"]]))
        pos += [Table(*t) for t in position_table(q, "sequential oracle")]
    out.append(Section("position", "Budgets along the sequence", "Does a budget that falls or rises along the sequence "
                       "beat a constant one of the same mean (paper section 4.2)? Measured against the per-token "
                       "prediction from the oracle at constant budgets.", ["position_budgets"], pos))
    s = res["skip_study"]
    if s:
        b = s["budgets"][0]
        out.append(Section("skip", "Skip study", f"Big or skip with exactly {s['skips']} layers skipped per token (paper "
                           "section 4.3): which layers the oracle skips, and whether that is early exit.",
                           ["skip_vs_early_exit"],
                           [Table(f"Skip study ({s['context']} context)",
                                  ["oracle [95%]", "fixed [95%]", "fixed pattern", "best of 100", "random [95%]",
                                   "tokens taking early exit"],
                                  [[_ci(b, "oracle_ppl"), _ci(b, "fixed_ppl"), b["fixed_pattern"] or "—",
                                    _fmt(b["best_of_100_ppl"]), _ci(b, "random_mean_ppl"), _fmt(s["early_exit_share"], 3)]])]))
    d = res["difficulty"]
    if d:
        dt = [Table(f"Token difficulty (gap = all-small loss − oracle loss at k={d['k_ref']}, {d['context']} context)",
                    ["measure", "value"],
                    [["Spearman(all-small loss, gap)", _fmt(d["spearman_small_loss_vs_gap"], 3)],
                     ["Spearman(all-small loss, all-small − all-big)", _fmt(d["spearman_small_loss_vs_big_gain"], 3)],
                     ["high-loss tokens (top quarter) gaining little (gap below median)", _fmt(d["high_loss_low_gain_share"], 3)],
                     ["top tenth by loss also in top tenth by gap", _fmt(d["top_decile_overlap"], 3)],
                     *[[f"mean gap, loss quartile {i + 1} (low to high)", _fmt(x, 3)]
                       for i, x in enumerate(d["mean_gap_by_loss_quartile"])],
                     ["mean gain of all-big over all-small (nats)", _fmt(d["mean_gain_big"], 4)]])]
        for key, title in (("top_by_gap", "highest gap"), ("top_by_loss", "highest all-small loss")):
            dt.append(Table(f"Tokens with the {title} (context [target])",
                            ["text", "loss small", "loss big", "loss oracle", "gap", "rank by loss", "rank by gap"],
                            [[visible(t["text"]), _fmt(t["loss_small"]), _fmt(t["loss_big"]), _fmt(t["loss_oracle"]),
                              _fmt(t["gap"]), str(t["loss_rank"]), str(t["gap_rank"])] for t in d[key]]))
        out.append(Section("difficulty", "Token difficulty", "A token's difficulty is its potential to gain from compute "
                           "(all-small loss minus the oracle's), not its raw loss: the two rank tokens differently.",
                           ["token_losses", "difficulty_ranking"], dt, tokens_html))
    if explorer:
        out.append(Section("explorer", "Token explorer", "Every scored token on its text, coloured by the loss you "
                           "choose; hover a token for all its losses, its oracle patterns and the routers' routes. Show "
                           "the hardest tokens, or those where a router and the oracle disagree; the table below the "
                           "text lists them and sorts on any column.", html=explorer))
    nul = res.get("null")
    if nul and res["oracle"]:
        real, null = res["oracle"][0], nul["oracle"]
        by_k = {b["k"]: b for b in null["budgets"]}
        gain = lambda b, o: None if b.get("oracle_ppl") is None else 1.0 - b["oracle_ppl"] / o["all_big_ppl"]
        out.append(Section("null", "Null control", "The model at initialisation through the same stages on the same "
                           "tokens: what a finding looks like when nothing was learned.", [],
                           [Table(f"Null control ({null['context']} context): all-big {_ci(null, 'all_big_ppl')}, "
                                  f"all-small {_ci(null, 'all_small_ppl')}",
                                  ["k", "oracle, null [95%]", "oracle gain over all-big, null",
                                   "oracle gain over all-big, trained"],
                                  [[str(b["k"]), _ci(by_k[b["k"]], "oracle_ppl"), _fmt(gain(by_k[b["k"]], null), 3),
                                    _fmt(gain(b, real), 3)] for b in real["budgets"] if b["k"] in by_k])]))
    sd = res.get("seeds")
    if sd:
        out.append(Section("seeds", "Across training seeds", "The same study with other training seeds: a finding that "
                           "changes its verdict between seeds is a property of one model, not of the method.", [],
                           [Table(f"Across {len(sd['seeds'])} training seeds ({', '.join(map(str, sd['seeds']))}; all-big "
                                  "perplexity " + ", ".join(_fmt(x["all_big_ppl"]) for x in sd["models"]) + ")",
                                  ["finding", "context", "effect per seed [95%]", "mean ± sd over seeds", "verdicts"],
                                  [[r["claim"], r["context"] or "—", "; ".join(_effect(e) for e in r["effects"]),
                                    "—" if r["mean"] is None else f"{r['mean']:+.3f} ± {_fmt(r['sd'], 3)}",
                                    ", ".join(v or "not tested" for v in r["verdicts"])] for r in sd["findings"]])]))
    out.append(Section("scale", "Scale", "The study at each model size on the same tokens: which findings hold, grow, "
                       "shrink or flip as the model grows (a rule frozen in the registry).", ["scale"],
                       [Table(*t) for t in scale.tables(res.get("scale"))]))
    out.append(Section("stage1", "Stage 1: Duo against FLOP-matched dense models (paper Fig. 8)", "", ["stage1"],
                       [Table(*t) for t in stage1.tables(res.get("stage1"))]))
    out.append(Section("wallclock", "Wall-clock speed of routed inference", "Measured by `duollm bench` on this machine.",
                       [], [Table(*t) for t in wallclock.tables(res.get("wallclock"))]))
    return out


def _equal_counts(res: dict) -> list[str]:
    """The candidate counts the oracle at equal count was measured at (one column each)."""
    return sorted({c for o in res["oracle"][:1] for b in o["budgets"] for c in (b.get("equal_count_ppl") or {})}, key=int)


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


def links(rd: RunData, difficulty: bool) -> list[tuple[str, str]]:
    """The data files the page links to, relative to ``RUN/report/``."""
    out = [(rundir.REPORT_RESULTS, rundir.REPORT_RESULTS), (rundir.REPORT_MD, rundir.REPORT_MD),
           (rundir.REPORT_FIGURES + "/", rundir.REPORT_FIGURES + "/")]
    if difficulty:
        out.append((rundir.DIFFICULTY_TABLE, rundir.DIFFICULTY_TABLE))
    for o in rd.oracles:
        if (o.folder / rundir.PER_TOKEN).is_file():
            out.append((f"oracle {o.name}: per_token.parquet", f"../{rundir.ORACLE}/{o.name}/{rundir.PER_TOKEN}"))
    for r in rd.routers:
        path = rundir.router_tokens(rd.run, r["name"])
        if path is not None:
            out.append((f"router {r['name']}: per-token", "../" + path.relative_to(rd.run).as_posix()))
    for sub in rundir.seed_dirs(rd.run) + rundir.scale_dirs(rd.run):  # the other seeds' and sizes' own pages
        if rundir.report_html(sub).is_file():
            out.append((f"{sub.name}: report", "../" + rundir.report_html(sub).relative_to(rd.run).as_posix()))
    return out


def render_html(res: dict, pngs: dict[str, bytes], tokens_html: str = "", explorer: str = "",
                data_links: list[tuple[str, str]] = ()) -> str:
    intro = [f"{headline(res)}. Model {res['model']['preset']}, data {res['data']['spec']}, "
             f"{_fmt(res['evaluation']['tokens'])} evaluation tokens, context policies "
             f"{', '.join(res['evaluation']['contexts']) or '—'}. Method: Alizadeh et al., arXiv 2410.10846."]
    banner = smoke_banner(res)
    return render_page(f"Duo-LLM study: {res['run']}", intro, summary_table(res), sections(res, tokens_html, explorer),
                       pngs, FIGURE_CAPTIONS, list(data_links), banner + "." if banner else None)


MD_SPECIAL = "\\`*_[]<>#|"


def _md_cell(s: str) -> str:
    """A table cell's text with Markdown's special characters escaped (token texts hold any of them)."""
    return "".join("\\" + c if c in MD_SPECIAL else c for c in s.replace("\n", "\u21b5"))


def _md_table(t: Table) -> list[str]:
    return [f"### {t.title}", "", "| " + " | ".join(_md_cell(h) for h in t.header) + " |", "|" + "---|" * len(t.header),
            *["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows], ""]


def render_markdown(res: dict, pngs: dict[str, bytes]) -> str:
    lines = [f"# Duo-LLM study: {res['run']}", "",
             f"{headline(res)}. Model {res['model']['preset']}, data {_md_cell(res['data']['spec'])}, "
             f"{_fmt(res['evaluation']['tokens'])} evaluation tokens, context policies "
             f"{', '.join(res['evaluation']['contexts']) or '—'}. Method: Alizadeh et al., arXiv 2410.10846.", ""]
    banner = smoke_banner(res)
    if banner:
        lines += [f"**{banner}.**", ""]
    summary = summary_table(res)
    if summary:
        lines += _md_table(summary)
    for sec in sections(res):
        figs = [name for name in sec.figures if name in pngs]
        if not (sec.tables or figs):
            continue
        lines += [f"## {sec.title}", ""] + ([sec.reading, ""] if sec.reading else [])
        for name in figs:
            lines += [f"![{name}](figures/{name}.png)", "", f"*{FIGURE_CAPTIONS.get(name, name)}*", ""]
        for t in sec.tables:
            lines += _md_table(t)
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
             rundir.REPORT_HTML: render_html(res, pngs, coloured_tokens_html(rd), explorer_html(explorer_data(rd)),
                                             links(rd, difficulty is not None))}
    with atomic_folder(rundir.report_dir(rd.run)) as tmp:
        for name, png in pngs.items():
            atomic_write_bytes(tmp / rundir.REPORT_FIGURES / f"{name}.png", png)
        if difficulty is not None:
            write_difficulty(tmp, difficulty, difficulty_columns)
        for name, text in files.items():
            atomic_write_text(tmp / name, text)
    return rundir.report_html(rd.run)
