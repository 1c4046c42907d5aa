"""A router's evaluation at hard routing (its ``eval.json``), and the comparison with the oracle.

Tensor legend (``docs/NOTATION.md``): L layers, S evaluation sequences, T positions.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write_json, write_table
from ..model.policy import Router, compute_big_fraction
from ..model.routing import BIG, LETTER_OF_ROUTE, SKIP, SMALL
from ..rundir import ROUTER_EVAL, ROUTER_TOKENS
from ..stats import budget_weights, finite_round, paired_ppl_difference, ppl_interval, ratio_estimate, recovered_share
from ..train.evaluate import per_token_loss, summarize
from .config import RouterConfig
from .labels import OracleTable, holdout_split


def run_router(model, router: Router, idx_ST, tgt_ST, batch_size: int = 16) -> dict:
    """Per-token loss and routes at hard routing (the router's mode is restored afterwards)."""
    mode, training = router.mode, router.training
    router.mode = "hard"
    router.eval()
    try:
        return per_token_loss(model, idx_ST, tgt_ST, router, batch_size=batch_size)
    finally:
        router.mode = mode
        router.train(training)


def _r(x, nd: int = 5):
    return finite_round(x, nd)


def usage(route_LST: torch.Tensor) -> dict:
    """Per-layer and per-position usage of big and skip, and a one-line layer profile."""
    big_LST = (route_LST == BIG).float()
    skip_LST = (route_LST == SKIP).float()
    per_layer_big = big_LST.mean(dim=(1, 2))
    return {
        "per_layer_big": _r(per_layer_big.tolist(), 4),
        "per_layer_skip": _r(skip_LST.mean(dim=(1, 2)).tolist(), 4),
        "per_position_big": _r(big_LST.mean(1).tolist(), 4),  # [L][T]
        "per_position_skip": _r(skip_LST.mean(1).tolist(), 4),
        "big_by_position": _r(big_LST.mean(dim=(0, 1)).tolist(), 4),  # [T], mean over layers
        "layer_profile": layer_profile(per_layer_big.tolist()),
    }


def layer_profile(per_layer_big: list[float]) -> str:
    """One line: the big fraction of each layer as a digit 0-9 (``9`` = at least 95% big), first layer first."""
    return "".join(str(min(9, int(round(10 * f)))) if f < 0.95 else "9" for f in per_layer_big)


def agreement(route_LST: torch.Tensor, oracle_LST: torch.Tensor, mask_ST: torch.Tensor) -> dict:
    """Share of (token, layer) routes equal to the oracle's, and of whole patterns equal."""
    if not mask_ST.any():
        return {"agreement": float("nan"), "pattern_match": float("nan")}
    eq_LST = route_LST == oracle_LST
    return {
        "agreement": eq_LST[:, mask_ST].float().mean().item(),
        "pattern_match": eq_LST.all(0)[mask_ST].float().mean().item(),
    }


def evaluate_router(model, router: Router, idx_ST, tgt_ST, cfg: RouterConfig, oracle: OracleTable | None = None,
                    labels: str | None = None, tokens_path: Path | None = None) -> dict:
    """The router's ``eval.json``: hard routing on the evaluation tokens (DESIGN 4.3, 5). ``labels``:
    where an imitation router's labels came from (``train`` or ``validation``; ``command.label_source``).
    ``tokens_path``: also write each token's loss and route there (``write_router_tokens``)."""
    L = model.cfg.n_layers
    res = run_router(model, router, idx_ST, tgt_ST, cfg.eval_batch)
    if tokens_path is not None:
        write_router_tokens(tokens_path, res)
    summary = summarize(res, model.flop_model.all_big())
    if router.peek is not None:  # it ran the small FFN at every layer before deciding (model/policy.py)
        fm = model.flop_model
        summary["compute"] += L * fm.ffn[SMALL] / fm.all_big()
    # the big fraction of a plain big/small router of the same compute: where its compute is matched (analysis/gap.py)
    summary["compute_big_fraction"] = compute_big_fraction(summary["big_fraction"], model.flop_model, router.peek is not None)
    out = {
        "method": cfg.method,
        "target": cfg.target,
        "target_k": cfg.budget_k(L),
        "options": cfg.options,
        "skip_target": cfg.skip_target if cfg.options != "B_" else 1.0 - cfg.target,
        **summary,
        "n_layers": L,
        "seq_len": int(idx_ST.shape[1]),
        "train_steps": cfg.train.steps,
        "enforced": cfg.enforce,  # exactly target_k bigs per token: compute matched to fixed@k and oracle@k
        **({"labels": labels} if labels else {}),
        **usage(res["route_LST"]),
        # every layer's route for every token of the first sequence (the report's route map, paper fig. 7)
        "example_routes": res["route_LST"][:, 0].tolist(),
    }
    if oracle is not None:
        comp = out["oracle"] = oracle_comparison(model, res, idx_ST, tgt_ST, cfg, oracle, peek=router.peek is not None)
        if labels == "validation" and "recovered" in comp:  # learned from some of these sequences: the headline
            # share is the held-out one, the share over every sequence stays beside it under its own name
            comp["recovered_all_sequences"] = comp.pop("recovered")
            comp["recovered"] = (comp.get("heldout") or {}).get("recovered")
            comp["recovered_matched"] = None
    return out


def oracle_comparison(model, res: dict, idx_ST, tgt_ST, cfg: RouterConfig, oracle: OracleTable, peek: bool = False) -> dict:
    """Agreement with the oracle at the same budget, on all covered tokens and on the held-out sequences.
    ``peek``: the router ran the small FFN at every layer (its realised compute counts it)."""
    b = oracle.budget
    comp = {
        "name": oracle.name,
        "k": oracle.k,
        "context": oracle.summary.get("context"),
        "tokens": int(oracle.covered_ST.sum()),
        # the router's perplexity on the oracle's tokens (the oracle may cover fewer than eval does)
        "ppl": math.exp(res["loss_ST"][oracle.covered_ST].double().mean().item()),
        **agreement(res["route_LST"], oracle.route_LST, oracle.covered_ST),
        **{key: b.get(key) for key in ("oracle_ppl", "fixed_ppl", "fixed_pattern", "random_mean_ppl", "best_of_100_ppl")},
        "all_big_ppl": oracle.summary.get("all_big_ppl"),
        "all_small_ppl": oracle.summary.get("all_small_ppl"),
        "oracle_usage": usage(oracle.route_LST[:, oracle.sequences]),
    }
    # paired comparisons on the sequences the oracle covers whole (stats.py: t-intervals over sequences)
    seq = oracle.sequences
    router_ST = res["loss_ST"][seq]
    if len(seq):
        ci = ppl_interval(router_ST)
        comp["ppl_lo"], comp["ppl_hi"] = ci["ppl_lo"], ci["ppl_hi"]
    if len(seq) and oracle.loss_ST is not None and not torch.isnan(oracle.loss_ST[seq]).any():
        comp["router_minus_oracle"] = paired_ppl_difference(router_ST, oracle.loss_ST[seq])
    fixed_ST = None
    if len(seq) and b.get("fixed_pattern"):
        fixed_ST = per_token_loss(model, idx_ST[seq], tgt_ST[seq], b["fixed_pattern"], batch_size=cfg.eval_batch)["loss_ST"]
        comp["router_minus_fixed"] = paired_ppl_difference(router_ST, fixed_ST)
    if len(seq) and fixed_ST is not None and oracle.loss_ST is not None:
        comp["per_sequence"] = per_sequence(res["route_LST"][:, seq], router_ST, fixed_ST, oracle.loss_ST[seq], seq)
        # the headline: the share of the oracle's gain over fixed@k the router recovers (analysis/gap.py), at its
        # budget k and at the compute it realised (fixed and oracle interpolated at its big fraction)
        comp["recovered"] = _recovered(router_ST, oracle.loss_ST[seq], fixed_ST)
        # at its compute: a peeking router's big fraction counts the small FFN it ran everywhere
        big = compute_big_fraction((res["route_LST"][:, seq] == BIG).float().mean().item(), model.flop_model, peek)
        comp["recovered_matched"] = _recovered_matched(res, router_ST, oracle, seq, big, L=model.cfg.n_layers)
        comp["count_vs_placement"] = count_vs_placement(res, router_ST, oracle, seq)
    _, held = holdout_split(seq, cfg.holdout_every)
    if len(held):
        mask_ST = torch.zeros_like(oracle.covered_ST)
        mask_ST[held] = True
        h = {"sequences": int(len(held)), "tokens": int(mask_ST.sum()),
             "ppl": math.exp(res["loss_ST"][held].double().mean().item()),
             **agreement(res["route_LST"], oracle.route_LST, mask_ST)}
        if oracle.loss_ST is not None and not torch.isnan(oracle.loss_ST[held]).any():
            h["oracle_ppl"] = math.exp(oracle.loss_ST[held].double().mean().item())
        if fixed_ST is not None:
            at = torch.isin(seq, held)  # the held-out sequences' rows among the covered ones
            h["fixed_ppl"] = math.exp(fixed_ST[at].double().mean().item())
            if oracle.loss_ST is not None and "oracle_ppl" in h:
                h["recovered"] = _recovered(router_ST[at], oracle.loss_ST[seq][at], fixed_ST[at])
        comp["heldout"] = h
    return comp


def _recovered_matched(res: dict, router_ST, oracle: OracleTable, seq, big_fraction: float, L: int) -> dict | None:
    """``recovered`` against the oracle and fixed curves at the router's realised compute, ``big_fraction`` (the big
    fraction of a plain router of that compute: ``stats.budget_weights``); None for a router that skips or an
    oracle without those budgets."""
    if (res["route_LST"] == SKIP).any():
        return None
    k0, w = budget_weights(big_fraction, L)
    cols = [oracle.column_ST(f"{kind}_loss_k{k}") for kind in ("oracle", "fixed") for k in (k0, k0 + 1)]
    if any(c is None or torch.isnan(c[seq]).any() for c in cols):
        return None
    o0, o1, f0, f1 = (c[seq] for c in cols)
    return _recovered(router_ST, (1 - w) * o0 + w * o1, (1 - w) * f0 + w * f1)


def count_vs_placement(res: dict, router_ST, oracle: OracleTable, seq) -> dict | None:
    """The router's share of oracle@k's gain over the out-of-sample fixed@k, split (issue 29, item 3) into
    ``how_many``: the share recovered by giving each token the out-of-sample fixed pattern of the number of big
    layers the router gave it (its counts alone), and ``which_layers``: the rest, the router's choice of layers
    for those counts (both shares with Fieller intervals; they add up to ``router``). None for a router that
    skips or an oracle without the out-of-sample fixed@k at every count the router used."""
    route_LST = res["route_LST"][:, seq]
    if (route_LST == SKIP).any() or oracle.loss_ST is None:
        return None
    count_ST = (route_LST == BIG).sum(0)
    fixed = {j: oracle.column_ST(f"fixed_oos_loss_k{j}") for j in {*count_ST.unique().tolist(), oracle.k}}
    if any(c is None or torch.isnan(c[seq]).any() for c in fixed.values()):
        return None
    count_only_ST = torch.zeros_like(router_ST)
    for j, c in fixed.items():
        at = count_ST == j
        count_only_ST[at] = c[seq][at].to(router_ST.dtype)
    oracle_ST, fixed_ST = oracle.loss_ST[seq], fixed[oracle.k][seq]
    as_np = lambda t: t.double().cpu().numpy().mean(1)
    return {"router": _recovered(router_ST, oracle_ST, fixed_ST), "how_many": _recovered(count_only_ST, oracle_ST, fixed_ST),
            "which_layers": finite_round(ratio_estimate(as_np(count_only_ST) - as_np(router_ST),
                                                        as_np(fixed_ST) - as_np(oracle_ST)), 5)}


def _recovered(router_ST, oracle_ST, fixed_ST) -> dict:
    """``stats.recovered_share`` of torch tensors; None for an undefined share (the oracle gains nothing)."""
    return finite_round(recovered_share(*(t.double().cpu().numpy() for t in (router_ST, oracle_ST, fixed_ST))), 5)


def per_sequence(route_LST: torch.Tensor, router_ST, fixed_ST, oracle_ST, seq) -> dict:
    """What the findings resample (analysis/findings.py): per evaluated sequence, the mean loss of the
    router, the fixed pattern and the oracle, the router's big share per layer, and its big share
    (mean over layers) at the early positions 1..T/4 (position 0 left out: it has no context) and
    at the rest."""
    big_LST = (route_LST == BIG).float()
    T = big_LST.shape[-1]
    q = max(2, T // 4)
    big_ST = big_LST.mean(0)
    return {
        "sequence": [int(i) for i in seq],
        "loss": _r(router_ST.double().mean(1).tolist(), 6),
        "fixed_loss": _r(fixed_ST.double().mean(1).tolist(), 6),
        "oracle_loss": _r(oracle_ST.double().mean(1).tolist(), 6),
        "big_by_layer": _r(big_LST.mean(2).T.tolist(), 4),  # [S][L]
        "big_early": _r(big_ST[:, 1:q].mean(1).tolist(), 4),
        "big_rest": _r(big_ST[:, q:].mean(1).tolist(), 4),
    }


def write_router_tokens(path: Path, res: dict) -> None:
    """Each evaluated token's loss and route pattern (``sequence``, ``position`` in the canonical evaluation
    order, as the oracle's ``per_token.parquet``): what the report's token explorer shows (issue 30)."""
    L, S, T = res["route_LST"].shape
    letters = np.array([LETTER_OF_ROUTE[r] for r in range(3)])  # route code -> pattern letter
    pattern_N = ["".join(row) for row in letters[res["route_LST"].reshape(L, -1).T.cpu().numpy()]]
    write_table(path, {"sequence": np.repeat(np.arange(S, dtype=np.int32), T),
                       "position": np.tile(np.arange(T, dtype=np.int32), S),
                       "loss": res["loss_ST"].reshape(-1).float().cpu().numpy(), "route": pattern_N})


def write_eval(out: Path, model, router: Router, idx_ST, tgt_ST, cfg: RouterConfig, oracle, log=print,
               labels: str | None = None) -> dict:
    """Evaluate at hard routing, write ``eval.json`` (and the per-token table) atomically and log a one-line summary."""
    result = evaluate_router(model, router, idx_ST, tgt_ST, cfg, oracle, labels, tokens_path=Path(out) / ROUTER_TOKENS)
    atomic_write_json(Path(out) / ROUTER_EVAL, result)
    line = (f"router {cfg.name}: ppl {result['ppl']:.3f}, big {result['big_fraction']:.3f} (target {cfg.target:.3f}), "
            f"skip {result['skip_fraction']:.3f}, layers {result['layer_profile']}")
    if oracle is not None:
        o = result["oracle"]
        line += (f"; on the oracle's {o['tokens']} tokens ppl {o['ppl']:.3f} vs oracle@{o['k']} {o['oracle_ppl']:.3f}, "
                 f"agreement {o['agreement']:.3f}")
    log(line)
    return result
