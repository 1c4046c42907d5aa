"""What an oracle run computes, fixed before the first token: the spec, its name, and the plan.

``OracleSpec`` holds the user's choices (candidate space, context policy, search) and names the
output folder. ``Plan`` turns a spec into arrays every chunk and every process shares: the
patterns the tree evaluates, which budget each counts for, the seeded "100 random patterns"
per budget (paper section 4.1), where the all-big / all-small baselines sit, and, for an exhaustive
search, the seeded subsets of the count-versus-compute nulls (``selection.py``).

Tensor name legend: P evaluated patterns, L layers, J reported budgets.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from ..model.routing import BIG, SMALL, parse_pattern, parse_routing
from .context import CONTEXTS
from .selection import Nulls, build_nulls
from .space import CandidateSpace, parse_budgets, pattern_codes

SEARCHES = ("exhaustive", "beam", "greedy")


def reference_label(reference, n_layers: int) -> str:
    """Short name of a frozen-context reference: B (all big), S (all small), a pattern, or a policy."""
    if reference is None:
        return "B"
    if isinstance(reference, str):
        if reference == "B" * n_layers:
            return "B"
        if reference == "S" * n_layers:
            return "S"
        return reference
    return getattr(reference, "name", type(reference).__name__)


def normalize_reference(reference, n_layers: int):
    """A frozen context's reference: None (all big), a routing spec naming a pattern (``B``, ``S``, a
    pattern; ``routing.parse_routing``), or a policy object such as a router; returns a pattern or the object."""
    if reference is None:
        return "B" * n_layers
    if callable(reference):
        return reference
    r = parse_routing(reference, n_layers)
    if r.kind != "pattern":
        raise ValueError(f"reference {reference!r} must be B, S, a pattern or router:NAME (a trained router of the run)")
    return r.pattern


DTYPES = ("float32", "bfloat16", "auto")


@dataclass
class OracleSpec:
    """The user's choices, each with its one default: what is searched (the candidate space, the context
    policy, the search; ``patterns``: an explicit candidate list instead of options/budgets) and how it is
    computed (the engine options, which never change a result's name).

    ``dtype``: float32 (exact; the default, so that a result does not depend on the CPU it ran on: bf16
    agrees to 0.03% in perplexity but moves ~8% of tokens to equally good patterns, docs/LOG.md), bfloat16
    (the layers' products), or auto (bfloat16 where the device has bf16 matrix units). ``batch_tokens``:
    tokens per chunk (the matrix-product size, the memory bound, the resume granularity). ``compile``:
    fuse each node's elementwise work with torch.compile (auto: for large runs). ``keep_matrix``: also
    write the [patterns, tokens] loss matrix. ``schedules_only``: the sequential oracle's three schedules
    only.
    """

    space: CandidateSpace
    context: str = "shared"
    reference: object = None  # a context policy with a reference only: pattern string or RoutingPolicy (default all-big)
    search: str = "exhaustive"
    beam_width: int = 4
    n_random: int = 100
    seed: int = 0
    patterns: tuple[str, ...] | None = None
    dtype: str = "float32"
    batch_tokens: int = 4096
    compile: bool | str = "auto"
    keep_matrix: bool = False
    schedules_only: bool = False

    def __post_init__(self):
        L = self.space.n_layers
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto, float32 or bfloat16; got {self.dtype!r}")
        if isinstance(self.batch_tokens, bool) or not isinstance(self.batch_tokens, int) or self.batch_tokens < 1:
            raise ValueError(f"--batch-tokens must be positive; got {self.batch_tokens!r}")
        self.compile = {"on": True, "off": False}.get(self.compile, self.compile)
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"compile must be on, off or auto; got {self.compile!r}")
        if self.context not in CONTEXTS:
            raise ValueError(f"unknown context {self.context!r}; use {', '.join(CONTEXTS)}")
        policy = CONTEXTS[self.context]
        if not policy.reference and self.reference is not None:
            with_reference = " or ".join(n for n, c in CONTEXTS.items() if c.reference)
            raise ValueError(f"--reference applies to the {with_reference} context only (use --context {with_reference})")
        if policy.engine == "sequential" and (self.search != "exhaustive" or self.patterns is not None):
            raise ValueError("the sequential oracle searches every candidate of each budget; drop --search/--patterns")
        if policy.reference:
            self.reference = normalize_reference(self.reference, L)
        if self.schedules_only and policy.engine != "sequential":
            raise ValueError("--schedules-only applies to the sequential context only (use --context sequential)")
        if self.search not in SEARCHES:
            raise ValueError(f"unknown search {self.search!r}; use exhaustive, beam or greedy")
        if self.search == "greedy":
            self.search, self.beam_width = "beam", 1
        if isinstance(self.beam_width, bool) or not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"beam width must be a positive integer; got {self.beam_width!r}")
        if self.search == "beam" and L > 39:
            raise ValueError(f"beam search supports up to 39 layers; the model has {L}")
        if self.n_random < 1:
            raise ValueError(f"the random baseline needs at least one pattern; got {self.n_random}")
        if self.patterns is not None:
            if self.search != "exhaustive":
                raise ValueError("an explicit pattern list is evaluated exhaustively; drop --search")
            pats = tuple(self.patterns)
            if not pats:
                raise ValueError("the explicit pattern list is empty")
            for p in pats:
                parse_pattern(p, L)
            if len(set(pats)) != len(pats):
                raise ValueError("the explicit pattern list has duplicates")
            self.patterns = pats

    @property
    def n_layers(self) -> int:
        return self.space.n_layers

    def name(self) -> str:
        """Output folder name, e.g. ``SB-shared``, ``SB-frozen-B``, ``B_-skip6-shared``, ``SB-shared-beam4``."""
        sp = self.space
        parts = ["list" if self.patterns is not None else sp.options]
        if self.patterns is None and sp.skips is not None:
            parts.append(f"skip{sp.skips}" if sp.skips_mode == "exact" else f"skipmax{sp.skips}")
        if self.patterns is None and sp.budget_mode == "max":
            parts.append("atmost")
        parts.append(self.context)
        if CONTEXTS[self.context].reference:
            parts.append(reference_label(self.reference, self.n_layers))
        if self.search == "beam":
            parts.append("greedy" if self.beam_width == 1 else f"beam{self.beam_width}")
        return "-".join(parts)

    def describe(self) -> dict:
        sp = self.space
        return {
            "options": sp.options,
            "skips": sp.skips,
            "skips_mode": sp.skips_mode if sp.skips is not None else None,
            "budget_mode": sp.budget_mode,
            "context": self.context,
            "reference": reference_label(self.reference, self.n_layers) if CONTEXTS[self.context].reference else None,
            "search": "greedy" if self.search == "beam" and self.beam_width == 1 else self.search,
            "beam_width": self.beam_width if self.search == "beam" else None,
            "n_random": self.n_random,
            "seed": self.seed,
            "patterns": list(self.patterns) if self.patterns is not None else None,
        }


def build_spec(n_layers: int, *, budgets=None, options: str | None = None, skips: int | None = None,
               skips_mode: str | None = None, budget_mode: str | None = None, patterns=None, **choices) -> OracleSpec:
    """Validate the user's choices, as the command line gives them (budgets ``all``, ``2-4``, ``4,6``; options
    ``SB``; patterns comma-separated), into an ``OracleSpec`` (one-line ValueErrors). ``choices``: any other
    field of the spec (context, reference, search, beam_width, seed, dtype, batch_tokens, compile,
    keep_matrix, schedules_only). A choice left out or None keeps the one default, ``CandidateSpace``'s or
    ``OracleSpec``'s: the command line's flags default to None for that reason."""
    if isinstance(patterns, str):
        patterns = tuple(p.strip() for p in patterns.split(",") if p.strip())
    given = {"--budgets": budgets not in (None, "all"), "--options": options is not None, "--skips": skips is not None,
             "--budget-mode": budget_mode is not None}
    if patterns is not None:
        changed = [flag for flag, set_ in given.items() if set_]
        if changed:
            raise ValueError(f"--patterns lists the candidates itself; drop {', '.join(changed)}")
        space = CandidateSpace(n_layers, options="SB_")
    else:
        constraints = {"options": options, "budget_mode": budget_mode, "skips": skips, "skips_mode": skips_mode}
        space = CandidateSpace(n_layers, budgets=parse_budgets(budgets, n_layers),
                               **{k: v for k, v in constraints.items() if v is not None})
    return OracleSpec(space, patterns=patterns, **{k: v for k, v in choices.items() if v is not None})


@dataclass
class Plan:
    """Arrays shared by every chunk: see the module docstring."""

    spec: OracleSpec
    budgets: tuple[int, ...]
    route_PL: np.ndarray  # int8, patterns the tree evaluates (candidates and/or samples, + baselines)
    code_P: np.ndarray  # int64 base-3 codes
    group_P: np.ndarray  # int: index into budgets' exact-bigs groups (exhaustive candidates), -1 otherwise
    group_bigs: tuple[int, ...]  # bigs count of each group
    member_JP: np.ndarray  # bool: pattern p counts for budget j (fixed@k / random@k readings)
    sample_JP: np.ndarray  # bool: pattern p is one of budget j's random draws
    candidates_J: np.ndarray  # candidate count per budget
    all_big: int
    all_small: int
    extra: dict = field(default_factory=dict)
    nulls: Nulls | None = None  # the count-versus-compute nulls: exhaustive searches of a candidate space only

    @property
    def n_layers(self) -> int:
        return self.route_PL.shape[1]

    def in_budget(self, bigs, k: int):
        """Whether ``bigs`` big layers count for budget k (an explicit list always counts exactly)."""
        if self.spec.patterns is not None:
            return bigs == k
        return self.spec.space.in_budget(bigs, k)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"spec": self.spec.describe(), "budgets": self.budgets}, sort_keys=True, default=str).encode())
        h.update(self.code_P.tobytes())
        h.update(self.sample_JP.tobytes())
        if self.nulls is not None:
            h.update(self.nulls.fingerprint())
        return h.hexdigest()


def _bigs(route_PL: np.ndarray) -> np.ndarray:
    return (route_PL == BIG).sum(1)


def build_plan(spec: OracleSpec, enumerate_limit: int = 1 << 20) -> Plan:
    sp, L = spec.space, spec.n_layers
    exhaustive = spec.search == "exhaustive"
    if spec.patterns is not None:
        cand_PL = np.array([parse_pattern(p, L) for p in spec.patterns], dtype=np.int8).reshape(-1, L)
        budgets = tuple(sorted(set(_bigs(cand_PL).tolist())))
        in_budget = lambda bigs, k: bigs == k  # an explicit list counts exactly
    else:
        budgets = sp.budgets
        in_budget = sp.in_budget
        cand_PL = sp.enumerate(enumerate_limit) if exhaustive else np.zeros((0, L), dtype=np.int8)

    # the random draws of each budget (the same seeded draw whatever the search)
    samples = []
    for j, k in enumerate(budgets):
        if spec.patterns is not None:
            members = cand_PL[in_budget(_bigs(cand_PL), k)]
            rng = np.random.default_rng([spec.seed, k, L])
            pick = rng.choice(len(members), size=min(spec.n_random, len(members)), replace=False)
            samples.append(members[np.sort(pick)])
        else:
            samples.append(sp.sample(spec.n_random, k, seed=spec.seed))

    baselines = np.array([[BIG] * L, [SMALL] * L], dtype=np.int8)
    pools = [cand_PL, baselines] + samples
    all_PL = np.concatenate(pools)
    code_all = pattern_codes(all_PL)
    code_P, first = np.unique(code_all, return_index=True)  # sorted, deduplicated
    route_PL = all_PL[first]
    index_of = {int(c): i for i, c in enumerate(code_P)}
    P = len(code_P)

    cand_mask_P = np.zeros(P, dtype=bool)
    cand_mask_P[[index_of[int(c)] for c in pattern_codes(cand_PL)]] = True
    bigs_P = _bigs(route_PL)
    J = len(budgets)
    sample_JP = np.zeros((J, P), dtype=bool)
    for j, smp in enumerate(samples):
        sample_JP[j, [index_of[int(c)] for c in pattern_codes(smp)]] = True
    if exhaustive:
        member_JP = np.stack([cand_mask_P & in_budget(bigs_P, k) for k in budgets]) if J else np.zeros((0, P), bool)
        group_bigs = tuple(sorted(set(bigs_P[cand_mask_P].tolist())))
        group_of_bigs = {b: g for g, b in enumerate(group_bigs)}
        group_P = np.array([group_of_bigs[int(b)] if c else -1 for b, c in zip(bigs_P, cand_mask_P)], dtype=np.int64)
        candidates_J = member_JP.sum(1)
        # an explicit list has no candidate space to draw the nulls from
        nulls = build_nulls(budgets, member_JP, cand_mask_P, bigs_P, L, spec.seed) if spec.patterns is None else None
    else:  # beam: fixed/random readings can only use the random draws
        member_JP = sample_JP.copy()
        group_bigs, group_P = (), np.full(P, -1, dtype=np.int64)
        candidates_J = np.array([sp.count(k) for k in budgets], dtype=np.int64)
        nulls = None  # the nulls need every candidate's loss
    return Plan(
        spec=spec,
        budgets=tuple(budgets),
        route_PL=route_PL,
        code_P=code_P,
        group_P=group_P,
        group_bigs=group_bigs,
        member_JP=member_JP,
        sample_JP=sample_JP,
        candidates_J=np.asarray(candidates_J, dtype=np.int64),
        all_big=index_of[int(pattern_codes(baselines[:1])[0])],
        all_small=index_of[int(pattern_codes(baselines[1:])[0])],
        nulls=nulls,
    )
