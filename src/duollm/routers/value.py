"""On-policy value targets for routers, computed exactly by the tree engine (issue 13, item 3).

Imitation learns the oracle's patterns, which are *off-policy*: a label at layer l assumes the
oracle's own routes before and after it, and context tokens routed by the oracle's choices. Here
the targets follow the router instead. The router routes every token of a sequence (hard, with
its budget enforced: exactly k bigs per token); those routes are the *context* (``FrozenContext``
with the router as reference). For each token and layer l on the router's own trajectory, the
target of route r is

    V_l(r) = min over patterns p with exactly k bigs, p[:l] = the router's routes, p[l] = r,
             of token t's loss under p (the context keeping the router's routes)

— the best final loss still reachable from the router's prefix. The ``rollout`` method (issue 29) replaces
that minimum, which rewards prefixes that keep many good completions open, by the router's own
continuation (Q^pi, ``rollout_targets``):

    Q_l(r) = token t's loss when it follows the router up to layer l, takes r at l, and the router
             (with its budget) from there on

— one forward of L + 1 variants per token: the router's own trajectory and one deviation per layer. One tree walk over the C(L, k)
exact-budget patterns gives every token's loss for every pattern (``walk_tree``); the minima
over the prefix-consistent patterns follow by masking. A route the budget forbids has V = inf.

DAgger (Ross et al., 2011): round 0 collects targets along the initial router's trajectory,
the router is trained on them, round 1 collects along the new router's trajectory, the router
is trained on everything collected so far, and so on; the rounds stop when the router's loss on
held-out training-split sequences stops improving, and the best round's router is kept.

Tensor legend (``docs/NOTATION.md``): S sequences, B batch, T positions, L layers, D width,
O the router's options (small, big), P patterns, N tokens.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..checkpoint import latest_checkpoint, load_weights, module_tensors, save_tensors
from ..config import to_dict
from ..data.corpus import sequences
from ..io import atomic_write_json
from ..model.model import DuoModel
from ..model.policy import Router
from ..model.routing import BIG, SMALL, format_pattern
from ..oracle import kernels as K
from ..oracle.context import FrozenContext, Head
from ..oracle.tree import walk_tree
from ..rundir import DAGGER_RECORD, ROUTER_DAGGER
from ..train.evaluate import per_token_loss
from ..train.loop import train_loop


def budget_patterns(n_layers: int, k: int) -> np.ndarray:
    """``route_PL``: every big/small pattern with exactly ``k`` bigs."""
    rows = [[BIG if layer in bigs else SMALL for layer in range(n_layers)]
            for bigs in itertools.combinations(range(n_layers), k)]
    return np.asarray(rows, dtype=np.int64).reshape(-1, n_layers)


def prefix_values(loss_PN: torch.Tensor, route_PL: torch.Tensor, route_LN: torch.Tensor, route_O: torch.Tensor):
    """``value_LNO``: per layer, token and option, the least loss over the patterns that agree with
    the token's routes ``route_LN`` before the layer and take the option at it (inf where none does)."""
    L, N = route_LN.shape
    value_LNO = torch.full((L, N, len(route_O)), float("inf"))
    match_PN = torch.ones_like(loss_PN, dtype=torch.bool)
    for layer in range(L):
        for o, route in enumerate(route_O.tolist()):
            take_PN = match_PN & (route_PL[:, layer] == route).unsqueeze(1)
            value_LNO[layer, :, o] = loss_PN.masked_fill(~take_PN, float("inf")).min(0).values
        match_PN &= route_PL[:, layer].unsqueeze(1) == route_LN[layer].unsqueeze(0)
    return value_LNO


def _trajectories(model: DuoModel, router: Router, idx_ST: torch.Tensor, tgt_ST: torch.Tensor, batch_size: int,
                  desc: str):
    """Chunk by chunk, the router's own trajectory at hard routing (its mode restored afterwards): yields
    ``(idx_BT, tgt_BT, ctx, rows)``: ``ctx`` the frozen context whose tokens the router routed, ``rows`` the
    chunk's ``x_NLD`` (the states entering each FFN), ``used_NL`` (bigs used before each layer) and ``route_NL``."""
    assert router.budget_k is not None, "on-policy targets need a router with an enforced budget"
    L = model.cfg.n_layers
    device = model.embed.weight.device
    mode, training = router.mode, router.training
    router.mode = "hard"
    router.eval()
    try:
        for s0 in tqdm(range(0, idx_ST.shape[0], batch_size), desc=desc, unit="chunk", dynamic_ncols=True, leave=False):
            idx_BT, tgt_BT = idx_ST[s0 : s0 + batch_size].to(device), tgt_ST[s0 : s0 + batch_size].to(device)
            B, T = idx_BT.shape
            x_L = []

            def recording(layer, x_BTD):
                x_L.append(x_BTD.float().cpu())
                return router(layer, x_BTD)

            ctx = FrozenContext(model, idx_BT, recording)  # context tokens routed by the router itself
            route_LN = ctx.route_LBT.reshape(L, -1).cpu()
            used_LN = torch.cumsum(route_LN == BIG, 0) - (route_LN == BIG).long()
            yield idx_BT, tgt_BT, ctx, {"x_NLD": torch.stack(x_L, 1).reshape(B * T, L, -1),
                                        "used_NL": used_LN.T.contiguous(), "route_NL": route_LN.T.contiguous()}
    finally:
        router.mode = mode
        router.train(training)


@torch.no_grad()
def collect_targets(model: DuoModel, router: Router, idx_ST: torch.Tensor, tgt_ST: torch.Tensor,
                    batch_size: int = 8) -> dict[str, torch.Tensor]:
    """The on-policy training data of one DAgger round, one row per token (N = S * T):

    ``x_NLD``      the hidden state entering each layer's FFN on the router's trajectory (its input)
    ``used_NL``    bigs the token used before each layer (the budget input)
    ``value_NLO``  V_l(r) of each option (module docstring); inf where the budget forbids it
    ``route_NL``   the route the router took
    ``pattern_loss_P``  each exact-budget pattern's summed loss (under the router's context)
    """
    route_PL = budget_patterns(model.cfg.n_layers, router.budget_k)
    route_PL_t = torch.from_numpy(route_PL)
    parts = {"x_NLD": [], "used_NL": [], "value_NLO": [], "route_NL": []}
    pattern_loss_P = torch.zeros(len(route_PL), dtype=torch.float64)
    for idx_BT, tgt_BT, ctx, rows in _trajectories(model, router, idx_ST, tgt_ST, batch_size,
                                                   f"on-policy targets, {len(route_PL)} patterns"):
        loss_PBT = torch.empty(len(route_PL), *idx_BT.shape)

        def consume(p_R, loss_RBT):
            loss_PBT[torch.from_numpy(p_R)] = loss_RBT.float().cpu()

        walk_tree(model, ctx, route_PL, model.embed(idx_BT).float(), tgt_BT, consume)
        value_LNO = prefix_values(loss_PBT.reshape(len(route_PL), -1), route_PL_t, rows["route_NL"].T, router.route_O.cpu())
        for key, v in {**rows, "value_NLO": value_LNO.transpose(0, 1).contiguous()}.items():
            parts[key].append(v)
        pattern_loss_P += loss_PBT.double().sum((1, 2))
    return {**{key: torch.cat(v) for key, v in parts.items()}, "pattern_loss_P": pattern_loss_P}


@torch.no_grad()
def rollout_targets(model: DuoModel, router: Router, idx_ST: torch.Tensor, tgt_ST: torch.Tensor,
                    batch_size: int = 8) -> dict[str, torch.Tensor]:
    """The on-policy data of one DAgger round of the ``rollout`` method: ``collect_targets``'s rows, with
    ``value_NLO`` = Q_l(r) (module docstring) instead of the best reachable loss; inf where the budget forbids
    the deviation. Also ``route_NML``: every variant's routes (m = 0 the router's own, m = l + 1 its
    deviation at layer l), for tests and inspection.

    The context tokens follow the router (``FrozenContext``); each token carries its M = L + 1 variants
    through the layers side by side, and at every layer past its deviation a variant takes the router's
    choice on its own state, with its own count of bigs (the budget as the router enforces it)."""
    L, k = model.cfg.n_layers, router.budget_k
    device = model.embed.weight.device
    head = Head(model)
    route_O = router.route_O
    deviates_M = torch.tensor([L, *range(L)], device=device)  # the layer variant m deviates at (L: never)
    parts = {"x_NLD": [], "used_NL": [], "value_NLO": [], "route_NL": [], "route_NML": []}
    for idx_BT, tgt_BT, ctx, rows in _trajectories(model, router, idx_ST, tgt_ST, batch_size,
                                                   f"rollouts, {L + 1} variants per token"):
        B, T = idx_BT.shape
        own_LBT = ctx.route_LBT
        h_BTMD = model.embed(idx_BT).float().unsqueeze(2).expand(B, T, L + 1, -1).contiguous()
        used_BTM = torch.zeros(B, T, L + 1, dtype=torch.long, device=device)
        feasible_BTM = torch.ones(B, T, L + 1, dtype=torch.bool, device=device)
        route_LBTM = torch.empty(L, B, T, L + 1, dtype=torch.long, device=device)
        for layer, block in enumerate(model.layers):
            mid_BTMD = ctx.residual(layer, h_BTMD)
            x_BTMD = K.norm(block.ffn_norm, mid_BTMD)
            own_BT1 = own_LBT[layer].unsqueeze(-1)
            chosen_BTM = route_O[router.budget_logits(layer, x_BTMD, used_BTM).argmax(-1)]
            flipped_BT1 = torch.where(own_BT1 == BIG, SMALL, BIG)
            route_BTM = torch.where(deviates_M > layer, own_BT1, torch.where(deviates_M == layer, flipped_BT1, chosen_BTM))
            # a deviation the budget forbids: big with none left, small where every layer left must go big
            at_M = deviates_M == layer
            forbidden_BT1 = torch.where(flipped_BT1 == BIG, used_BTM[..., layer + 1 : layer + 2] >= k,
                                        k - used_BTM[..., layer + 1 : layer + 2] >= L - layer)
            feasible_BTM[..., at_M] &= ~forbidden_BT1
            big_BTMD = K.ffn_residual(block.ffn.big, mid_BTMD, x_BTMD)
            small_BTMD = K.ffn_residual(block.ffn.small, mid_BTMD, x_BTMD)
            h_BTMD = torch.where((route_BTM == BIG).unsqueeze(-1), big_BTMD, small_BTMD)
            used_BTM = used_BTM + (route_BTM == BIG)
            route_LBTM[layer] = route_BTM
        loss_MBT = head(h_BTMD.permute(2, 0, 1, 3), tgt_BT.expand(L + 1, B, T))
        loss_BTM = loss_MBT.permute(1, 2, 0).masked_fill(~feasible_BTM, float("inf")).float()
        # Q of the router's own route at layer l: its own loss; of the other route: variant l + 1's
        q_LBTO = torch.where(own_LBT.unsqueeze(-1) == route_O, loss_BTM[..., :1].unsqueeze(0),
                             loss_BTM[..., 1:].permute(2, 0, 1).unsqueeze(-1))
        for key, v in {**rows, "value_NLO": q_LBTO.reshape(L, B * T, -1).transpose(0, 1).cpu().contiguous(),
                       "route_NML": route_LBTM.permute(1, 2, 3, 0).reshape(B * T, L + 1, L).cpu()}.items():
            parts[key].append(v)
    return {key: torch.cat(v) for key, v in parts.items()}


HELDOUT_TOKENS = 4096  # training-split tokens (after the collection's) that decide when the rounds stop


def regret(data: dict[str, torch.Tensor], route_O: torch.Tensor) -> float:
    """Mean V(chosen) - min V over the open decisions of the trajectory the data was collected on."""
    value_NLO = data["value_NLO"]
    chosen_NL = (data["route_NL"].unsqueeze(-1) == route_O).float().argmax(-1, keepdim=True)
    open_NL = torch.isfinite(value_NLO).all(-1)
    gap_NL = value_NLO.gather(-1, chosen_NL).squeeze(-1) - value_NLO.min(-1).values
    return gap_NL[open_NL].double().mean().item() if open_NL.any() else 0.0


def dagger(model: DuoModel, trainer, cfg, out, train_tokens: np.ndarray, make_objective, *, device,
           resume: bool, log=print, collect=collect_targets) -> dict:
    """Train a value router in DAgger rounds (module docstring); returns the record (``dagger.json``).

    Round r: collect targets (``collect``: ``collect_targets`` or ``rollout_targets``) along the current
    router's trajectory on ``cfg.value_tokens``
    training-split tokens (saved in ``dagger/round-<r>.safetensors``), train the router on every
    round's rows for ``cfg.train.steps`` more steps (``train_loop``, which checkpoints and resumes;
    its learning-rate schedule restarts each round), score it on held-out training-split sequences.
    The router starts as the best fixed pattern of a table of the first training sequences (a router
    that realises fixed@k); the rounds stop when one is no better than the round before, and the best
    router (the start included) is left in ``trainer.router``.
    """
    router, out = trainer.router, Path(out)
    T = cfg.train.seq_len
    idx_ST, tgt_ST = sequences(train_tokens, T, cfg.value_tokens + HELDOUT_TOKENS)
    n = max(1, min(len(idx_ST) - 1, cfg.value_tokens // T))
    folder = out / ROUTER_DAGGER
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / DAGGER_RECORD
    record = json.loads(record_path.read_text()) if resume and record_path.is_file() else {"rounds": []}

    def heldout_loss() -> float:
        router.mode = "hard"
        return per_token_loss(model, idx_ST[n:], tgt_ST[n:], router, batch_size=cfg.eval_batch)["loss_ST"].double().mean().item()

    def round_file(r: int, what: str) -> Path:
        return folder / f"{what}-{r}.safetensors"

    if "start" not in record:  # the best fixed pattern on the first training sequences: where the router starts
        table = collect_targets(model, router, idx_ST[: min(n, 8)], tgt_ST[: min(n, 8)], batch_size=max(1, 2048 // T))
        pattern = budget_patterns(model.cfg.n_layers, router.budget_k)[table["pattern_loss_P"].argmin().item()]
        router.init_pattern(pattern)
        record["start"] = {"pattern": format_pattern(pattern), "heldout_loss": heldout_loss()}
        save_tensors(round_file(-1, "router"), module_tensors(router))
        atomic_write_json(record_path, record)
    data, start = [], len(record["rounds"])
    for r in range(start):
        data.append(load_file(str(round_file(r, "round"))))
    load_weights(router, round_file(start - 1, "router"), what="router weights")
    for r in range(start, cfg.dagger_rounds if not record.get("stopped") else start):
        tick = time.perf_counter()
        path = round_file(r, "round")
        if path.is_file():  # collected before an interruption
            rows = load_file(str(path))
        else:
            rows = collect(model, router, idx_ST[:n], tgt_ST[:n], batch_size=max(1, 2048 // T))
            rows.pop("route_NML", None)  # the rollouts' own routes: for inspection, not training
            save_tensors(path, rows)
        rows.pop("pattern_loss_P", None)
        data.append(rows)
        merged = {key: torch.cat([d[key] for d in data]) for key in rows}
        steps = copy.copy(cfg.train)
        steps.steps = (r + 1) * cfg.train.steps
        train_loop(make_objective(merged), steps, train_tokens, out, device=device,
                   resume=latest_checkpoint(out) is not None, desc=f"router {cfg.name} round {r}", run_config=to_dict(cfg))
        loss = heldout_loss()
        save_tensors(round_file(r, "router"), module_tensors(router))
        record["rounds"].append({"round": r, "tokens": int(n * T), "rows": int(merged["x_NLD"].shape[0]),
                                 "regret_before": regret(rows, router.route_O.cpu()), "heldout_loss": loss,
                                 "seconds": round(time.perf_counter() - tick, 1)})
        log(f"router {cfg.name} round {r}: held-out loss {loss:.4f} (start {record['start']['heldout_loss']:.4f}), "
            f"regret of the collected trajectory {record['rounds'][-1]['regret_before']:.4f} nats")
        if r >= 1 and loss >= record["rounds"][-2]["heldout_loss"]:
            record["stopped"] = True  # stopped improving (a resumed run adds no rounds)
        atomic_write_json(record_path, record)
        if record.get("stopped"):
            break
    candidates = [(record["start"]["heldout_loss"], -1)] + [(x["heldout_loss"], x["round"]) for x in record["rounds"]]
    record["best_round"] = min(candidates)[1]
    load_weights(router, round_file(record["best_round"], "router"), what="router weights")
    atomic_write_json(record_path, record)
    return record

