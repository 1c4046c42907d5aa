"""Router training methods: one registry entry each (paper section 3.3 and the methods beyond it).

A method says what a router learns from and the loss of one batch; everything else — the router, the
training loop, checkpoints, resume, calibration, the evaluation against the oracle — is shared. The
entry carries what the rest of duollm needs to know about it, so no other module compares method names:

    data       "lm"      random windows of the training split, routed through the frozen LM (budget,
                         straight-through)
               "labels"  the oracle's per-token patterns at the router's budget (imitation: a training-split
                         oracle, else part of the validation table)
               "values"  on-policy value targets (the tree engine's best reachable loss, or the router's own
                         rollouts), in DAgger rounds (routers/value.py);
                         a step needs no LM forward, so the study's router_steps and router_batch do not apply
    defaults   RouterConfig values the method needs unless ``--set`` says otherwise
    requires   RouterConfig values it cannot work without (a config that differs is refused), and why

To add a method: ``register(RouterMethod(...))`` with its loss, here or in a module imported before the
router is trained (tests/test_routers.py registers one from the test), plus a test of its loss.
``duollm router --method NAME`` and ``study.router_methods`` then take it.

Tensor legend (``docs/NOTATION.md``): B batch, T positions, L layers, R routes, O options, X open decisions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from ..model.routing import BIG, SKIP, SMALL

DATA = ("lm", "labels", "values")


@dataclass(frozen=True)
class RouterMethod:
    name: str
    loss: Callable  # (trainer, batch) -> scalar loss; ``trainer`` is the ``objectives.RouterTrainer``
    data: str = "lm"  # lm | labels | values (module docstring)
    defaults: dict = field(default_factory=dict)
    requires: dict = field(default_factory=dict)
    requires_why: str = ""  # said when a config breaks ``requires``
    targets: tuple[str, ...] = ()  # what a "labels" method needs beside the oracle's patterns: "benefit" (labels.py)
    labels: str = "best"  # whose per-token patterns a "labels" method imitates: the oracle's, or "belief" (labels.py)
    values: str = "best"  # a "values" method's targets: the best reachable loss, or "rollout": Q^pi (value.py)
    peek: bool = False  # the router also sees the small FFN's output at each layer, its cost counted (model/policy.py)
    summary: str = ""  # one line for `duollm router --help`

    def __post_init__(self):
        if self.values not in ("best", "rollout"):
            raise ValueError(f"router method {self.name!r}: values must be best or rollout; got {self.values!r}")
        if self.labels not in ("best", "belief"):
            raise ValueError(f"router method {self.name!r}: labels must be best or belief; got {self.labels!r}")
        if self.data not in DATA:
            raise ValueError(f"router method {self.name!r}: data must be one of {', '.join(DATA)}; got {self.data!r}")


METHODS: dict[str, RouterMethod] = {}


def register(method: RouterMethod) -> RouterMethod:
    """Add ``method`` to the registry (a method of the same name is replaced: re-running a notebook cell)."""
    METHODS[method.name] = method
    return method


def get(name: str) -> RouterMethod:
    if name not in METHODS:
        raise ValueError(f"unknown router method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]


# ----------------------------------------------------------------------------- the losses


def budget_loss(trainer, mb: dict, mode: str = "soft") -> torch.Tensor:
    """CE + alpha * mean_B (mean_{L,T} P(big) - target)^2 (paper section 3.3), per sequence.

    ``soft`` (budget) mixes the routes softly; ``straight-through`` routes hard, so its budget term
    measures the realised fractions (value) while its gradient is the softmax's.
    """
    c = trainer.cfg
    beta = float(mb["beta_B"][0])
    w_L = []

    def policy(layer, x_BTD):
        prob_BTR = trainer.router.weights(trainer.router.logits(layer, x_BTD), mode, beta)
        w_L.append(prob_BTR)
        return prob_BTR

    out = trainer.lm(mb["idx_BT"], mb["tgt_BT"], policy, return_logits=False)
    prob_LBTR = torch.stack(w_L)
    big_B = prob_LBTR[..., BIG].mean(dim=(0, 2))
    penalty = ((big_B - c.target) ** 2).mean()
    if c.options == "SB_":
        skip_B = prob_LBTR[..., SKIP].mean(dim=(0, 2))
        penalty = penalty + ((skip_B - c.skip_target) ** 2).mean()
    return out.loss + c.alpha * penalty


def teacher_forced_logits(trainer, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits_LBTO, route_LBT)``: the router's logits at every layer with the model routed by the oracle's
    patterns (teacher forcing). The LM's weights are frozen and its input needs no gradient, so no graph is
    built through it: only the router learns."""
    route_LBT = mb["route_BLT"].transpose(0, 1)
    logits_L = []

    def policy(layer, x_BTD):
        logits_L.append(trainer.router.logits(layer, x_BTD))
        return route_LBT[layer]

    trainer.lm(mb["idx_BT"], None, policy, return_logits=False)
    return torch.stack(logits_L), route_LBT


def imitation_loss(trainer, mb: dict) -> torch.Tensor:
    """Cross-entropy of each layer's router logits against the oracle's route (teacher forcing)."""
    logits_LBTO, route_LBT = teacher_forced_logits(trainer, mb)
    label_LBT = trainer.router.option_of_R[route_LBT]
    return F.cross_entropy(logits_LBTO.flatten(0, 2), label_LBT.flatten())


BENEFIT_SCALE = 10.0  # logits per nat: the expected benefits are 0.01-0.1 nats, a router's logits O(1)


def expected_benefit_loss(trainer, mb: dict) -> torch.Tensor:
    """Regression of each layer's big-minus-small logit on the expected benefit of big there (``labels.
    expected_benefit``, x ``BENEFIT_SCALE``), on the states of the oracle's routes as imitation sees them. The
    budget is met afterwards by one offset on the big logit (calibration): big goes where the predicted benefit
    is largest."""
    logits_LBTO, _ = teacher_forced_logits(trainer, mb)
    option_of_R = trainer.router.option_of_R
    margin_LBT = logits_LBTO[..., option_of_R[BIG]] - logits_LBTO[..., option_of_R[SMALL]]
    target_LBT = BENEFIT_SCALE * mb["benefit_BLT"].transpose(0, 1)
    scored = torch.isfinite(target_LBT)
    return F.mse_loss(margin_LBT[scored], target_LBT[scored])


def value_loss(trainer, mb: dict, regret: bool = False) -> torch.Tensor:
    """On-policy targets (routers/value.py), on the states the router met; no LM forward.

    ``value``: cross-entropy against the route of least V (the best reachable loss); ``rollout`` the same
    against Q^pi (the router's own continuation);
    ``expected-cost`` (``regret``): sum_r pi(r | x) (V(r) - min V), the expected regret in nats. Only
    decisions the budget leaves open count (forced ones have an infinite V on one side).
    """
    x_BTLD, used_BTL, value_BTLO = mb["x_BTLD"], mb["used_BTL"], mb["value_BTLO"]
    terms = []
    for layer in range(x_BTLD.shape[2]):
        value_BTO = value_BTLO[:, :, layer]
        open_BT = torch.isfinite(value_BTO).all(-1)
        logits_XO = trainer.router.budget_logits(layer, x_BTLD[:, :, layer], used_BTL[:, :, layer])[open_BT]
        value_XO = value_BTO[open_BT]
        if not regret:
            terms.append(F.cross_entropy(logits_XO, value_XO.argmin(-1), reduction="none"))
        else:
            regret_XO = value_XO - value_XO.min(-1, keepdim=True).values
            terms.append((torch.softmax(logits_XO, -1) * regret_XO).sum(-1))
    return torch.cat(terms).mean()


# ----------------------------------------------------------------------------- the registry's entries

register(RouterMethod("budget", budget_loss, summary="the paper's router: soft mix, beta annealed, CE + alpha * budget term"))
# its forward pass is hard already, and a sharpened softmax only starves its gradient (on the tiny model an
# annealed straight-through router oscillates between whole-layer flips): beta stays at beta_start
register(RouterMethod("straight-through", partial(budget_loss, mode="straight-through"),
                      defaults={"beta_schedule": "constant"},
                      summary="the budget loss with hard routes forward, the softmax's gradient backward"))
# The oracle's labels are minority-big at most layers when k < L/2 (20-44% big per layer at k=4 on the cpu
# preset), so the argmax of a well-fitted probe picks small almost everywhere and the realised budget
# collapses (0.19 for a 0.33 target). Imitation is trained without any budget term, so its budget is met
# afterwards by one offset on the big logit (``calibrate_budget``).
register(RouterMethod("imitation", imitation_loss, data="labels", defaults={"calibrate": True},
                      summary="supervised on the oracle's per-token patterns at the router's budget"))
# issue 29: the pattern whose predictive distribution is closest (KL) to all-big's, per token (the belief oracle):
# a target that needs no labels, so it can be made on any text. Calibrated like imitation: the belief patterns are
# minority-big where all-big's distribution is easy to match with small layers
register(RouterMethod("consistency", imitation_loss, data="labels", defaults={"calibrate": True}, labels="belief",
                      summary="imitates the belief oracle: per token the pattern whose distribution is closest (KL) "
                              "to all-big's, a target made without labels"))
register(RouterMethod("expected-benefit", expected_benefit_loss, data="labels", defaults={"calibrate": True},
                      requires={"options": "SB"}, requires_why="its target is the benefit of big over small",
                      targets=("benefit",),
                      summary="regresses each layer's expected gain from big (the mean over the budget's patterns, "
                              "not the oracle's minimum)"))
# issue 29: a router that sees the small FFN's output before deciding (the signals that beat fixed patterns in the
# literature read the token after some compute was spent on it). It learns the expected benefit of big, and pays
# the small FFN at every layer: calibrated to the big fraction at which its compute equals fixed@k's
register(RouterMethod("peek", expected_benefit_loss, data="labels", defaults={"calibrate": True},
                      requires={"options": "SB", "enforce": False},
                      requires_why="it weighs big against the small output it has seen, at a compute-matched big fraction",
                      targets=("benefit",), peek=True,
                      summary="expected-benefit with the small FFN's output seen at each layer before deciding; its "
                              "compute (small everywhere + big where routed) matched to fixed@k's"))
# the on-policy targets (routers/value.py) are the best loss reachable under exactly k bigs
EXACT_K = "its targets assume exactly k bigs per token"
register(RouterMethod("value", value_loss, data="values", defaults={"enforce": True}, requires={"enforce": True},
                      requires_why=EXACT_K, summary="cross-entropy against the route of least on-policy value, DAgger rounds"))
register(RouterMethod("expected-cost", partial(value_loss, regret=True), data="values", defaults={"enforce": True},
                      requires={"enforce": True}, requires_why=EXACT_K,
                      summary="the expected regret of the router's choice, DAgger rounds"))
# issue 29: the loss of the router's own continuation after a deviation (Q^pi), not the best reachable one: a
# target that does not reward prefixes for keeping many good completions open
register(RouterMethod("rollout", value_loss, data="values", defaults={"enforce": True}, requires={"enforce": True},
                      requires_why=EXACT_K, values="rollout",
                      summary="cross-entropy against the route whose rollout under the router itself (Q^pi) is "
                              "best, DAgger rounds"))
