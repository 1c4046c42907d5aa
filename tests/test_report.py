"""The analysis package: rank statistics, the findings' criteria, token difficulty, and a report that
copes with whatever the run folder holds (issue 5, DESIGN 4.4)."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from duollm.analysis.difficulty import rankdata, spearman
from duollm.analysis.evidence import view
from duollm.analysis.figures import fig_ppl_vs_budget, png_bytes
from duollm.analysis.findings import (
    big_layers_by_budget,
    constant_budget_best,
    one_big_beats_all_big,
    oracle_u_shape,
    routers_early_tokens_more_big,
    routers_favour_late_layers,
    routers_near_baselines,
    skip_not_early_exit,
    u_window,
)
from duollm.analysis.report import write_report
from duollm.analysis.rundata import Oracle, RunData, reference_budgets
from duollm.data.cache import load_tokens
from duollm.oracle.command import run_oracle_command
from duollm.stats import VERDICTS

# ----------------------------------------------------------------------------- rank statistics


def test_rankdata_averages_ties_and_spearman_matches_definition():
    assert rankdata(np.array([10.0, 20.0, 10.0, 30.0])).tolist() == [1.5, 3.0, 1.5, 4.0]
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, np.ones(5)) is None
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 6, 300).astype(float), rng.normal(size=300)
    stats = pytest.importorskip("scipy.stats")
    np.testing.assert_allclose(rankdata(a), stats.rankdata(a))
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-12)


# ----------------------------------------------------------------------------- findings' criteria


def synthetic_oracle(folder, losses: dict, patterns: dict | None = None, summary: dict | None = None, seed=0):
    """An oracle folder with a per-token table: ``losses`` column -> [S, T] losses, ``patterns`` column ->
    [S][T] pattern strings (or one string for every token)."""
    import pyarrow as pa

    folder.mkdir(parents=True, exist_ok=True)
    S, T = next(iter(losses.values())).shape
    cols = {"sequence": np.repeat(np.arange(S), T).astype(np.int32), "position": np.tile(np.arange(T), S).astype(np.int32),
            "target": np.arange(S * T, dtype=np.int32) % 7}
    cols.update({k: np.asarray(v, np.float32).reshape(-1) for k, v in losses.items()})
    for k, v in (patterns or {}).items():
        cols[k] = np.broadcast_to(np.asarray(v), (S, T)).reshape(-1).tolist()
    pq.write_table(pa.table(cols), str(folder / "per_token.parquet"))
    return Oracle(folder, {"context": "shared", **(summary or {})})


def noisy(rng, mean, S=24, T=16, sd=0.3):
    """Per-token losses with sequence-level noise (the unit the bootstrap resamples)."""
    return mean + rng.normal(0, sd, (S, 1)) + rng.normal(0, 0.5, (S, T))


def u_sweep(tmp_path, name, curve, seed=0, all_big=None):
    rng = np.random.default_rng(seed)
    base = noisy(rng, 0.0)
    losses = {f"oracle_loss_k{k}": base + c + rng.normal(0, 0.01, base.shape) for k, c in enumerate(curve)}
    losses["loss_all_big"] = base + (curve[-1] if all_big is None else all_big)
    losses["loss_all_small"] = base + curve[0]
    return view(synthetic_oracle(tmp_path / name, losses))


def test_u_shape_and_one_big_three_verdicts(tmp_path):
    L = 8  # window L/2 ± 1 = 3..5
    u = u_sweep(tmp_path, "u", [3.0, 2.5, 2.3, 2.1, 2.0, 2.1, 2.2, 2.4, 2.6])
    assert u_window(8) == (3, 5)
    f = oracle_u_shape(u, None, L)
    assert f.verdict == "reproduced" and f.numbers["k_best"] == 4 and f.effect["lo"] > 0
    falling = u_sweep(tmp_path, "falling", [3.0, 2.8, 2.6, 2.4, 2.2, 2.1, 2.0, 1.9, 1.8])
    assert oracle_u_shape(falling, None, L).verdict == "contradicted"
    flat = u_sweep(tmp_path, "flat", [3.0, 2.5, 2.3, 2.1, 2.1, 2.1, 2.1, 2.4, 2.6])  # k = 3..6 tie: no clear window
    assert oracle_u_shape(flat, None, L).verdict == "inconclusive"
    # the same U-shape in the null (an untrained model shows it too): not evidence
    null_u = u_sweep(tmp_path, "null", [3.0, 2.5, 2.3, 2.1, 2.0, 2.1, 2.2, 2.4, 2.6], seed=1)
    gated = oracle_u_shape(u, null_u, L)
    assert gated.verdict == "inconclusive" and gated.effect["lo"] > 0 and gated.effect["null"] > 0
    assert one_big_beats_all_big(u, None).verdict == "reproduced"  # oracle@1 2.5 < all-big 2.6
    worse = u_sweep(tmp_path, "worse", [3.0, 2.7, 2.3, 2.1, 2.0, 2.1, 2.2, 2.4, 2.5])
    assert one_big_beats_all_big(worse, None).verdict == "contradicted"
    assert oracle_u_shape(None, None, L).verdict is None


def placement(tmp_path, name, small_late: bool, large_early: bool, seed=0):
    rng = np.random.default_rng(seed)
    S, T = 24, 16
    late, early = "SSSSSSSSBBBB", "BBBBSSSSSSSS"  # k = 4 of 12 (L/3)
    late8, early8 = "SSSSBBBBBBBB", "BBBBBBBBSSSS"  # k = 8 of 12 (2L/3)

    def mix(main, other):  # most tokens take ``main``, a random fifth the other
        pick = rng.random((S, T)) < 0.8
        return np.where(pick, main, other).tolist()

    losses = {f"oracle_loss_k{k}": noisy(rng, 2.0) for k in (4, 8)}
    pats = {"best_pattern_k4": mix(late if small_late else early, early if small_late else late),
            "best_pattern_k8": mix(early8 if large_early else late8, late8 if large_early else early8)}
    return view(synthetic_oracle(tmp_path / name, losses, pats))


def test_placement_slopes_have_opposite_signs(tmp_path):
    assert reference_budgets(12) == {"small": 4, "middle": 6, "large": 8}  # the paper's L/3, L/2, 2L/3
    ok = big_layers_by_budget(placement(tmp_path, "ok", True, True), None, 12)
    assert ok.verdict == "reproduced"
    assert ok.numbers["slopes"]["small"]["lo"] > 0 and ok.numbers["slopes"]["large"]["hi"] < 0
    assert big_layers_by_budget(placement(tmp_path, "late", True, False), None, 12).verdict == "contradicted"


def test_skip_finding_measures_how_far_the_rates_are_from_monotone(tmp_path):
    rng = np.random.default_rng(0)
    S, T = 24, 16
    losses = {"oracle_loss_k2": noisy(rng, 2.0)}
    varied = np.where(rng.random((S, T)) < 0.5, "_BB_", "__BB").tolist()  # layer 0 often skipped, 2 rarely
    f = skip_not_early_exit(view(synthetic_oracle(tmp_path / "a", losses, {"best_pattern_k2": varied})), None, 4, 2)
    assert f.verdict == "reproduced" and f.effect["lo"] > 0 and f.numbers["early_exit_pattern"] == "BB__"
    ee = skip_not_early_exit(view(synthetic_oracle(tmp_path / "b", losses, {"best_pattern_k2": "BB__"})), None, 4, 2)
    assert ee.verdict == "inconclusive" and ee.effect["value"] == 0  # early exit: rates never fall
    assert skip_not_early_exit(None, None, 4, 2).verdict is None


def sequential_oracle_view(tmp_path, name, const, fall, rise, seed=0):
    rng = np.random.default_rng(seed)
    base = noisy(rng, 2.0)
    losses = {"oracle_loss_k4": base + const, "schedule_loss_falling": base + fall + rng.normal(0, 0.01, base.shape),
              "schedule_loss_rising": base + rise + rng.normal(0, 0.01, base.shape)}
    pb = [{"name": n, "schedule": s, "mean_budget": 4.0, "oracle_ppl": 1.0}
          for n, s in (("constant", "4->4"), ("falling", "6->2"), ("rising", "2->6"))]
    return view(synthetic_oracle(tmp_path / name, losses, summary={"context": "sequential", "position_budgets": pb}))


def test_constant_budget_finding_on_the_sequential_oracle(tmp_path):
    good = sequential_oracle_view(tmp_path, "good", 0.0, 0.05, 0.1)
    assert constant_budget_best(good, None, {}).verdict == "reproduced"
    bad = sequential_oracle_view(tmp_path, "bad", 0.0, -0.05, 0.1)
    assert constant_budget_best(bad, None, {}).verdict == "contradicted"
    null = sequential_oracle_view(tmp_path, "null", 0.0, 0.05, 0.1, seed=1)
    assert constant_budget_best(good, null, {}).verdict == "inconclusive"  # the null shows the same
    assert constant_budget_best(None, None, {}).verdict is None


def fake_router_run(tmp_path, routers):
    for name, ev in routers.items():
        (tmp_path / "routers" / name).mkdir(parents=True)
        (tmp_path / "routers" / name / "eval.json").write_text(json.dumps(ev))
    (tmp_path / "config.yaml").write_text("preset: tiny\nmodel:\n  n_layers: 4\n")
    return RunData(tmp_path)


def router_eval(method, loss_S, early_minus_rest, late_slope, rng, fixed_S=None, k=2, L=4):
    S = len(loss_S)
    by_layer = np.clip(0.5 + late_slope * (np.arange(L) - 1.5) + rng.normal(0, 0.02, (S, L)), 0, 1)
    rest = np.full(S, 0.5) + rng.normal(0, 0.01, S)
    return {"method": method, "target": k / L, "ppl": float(np.exp(np.mean(loss_S))), "big_fraction": k / L,
            "oracle": {"k": k, "per_sequence": {
                "sequence": list(range(S)), "loss": list(map(float, loss_S)),
                "fixed_loss": list(map(float, fixed_S if fixed_S is not None else loss_S + 0.001)),
                "oracle_loss": [0.0] * S, "big_by_layer": by_layer.tolist(),
                "big_early": (rest + early_minus_rest).tolist(), "big_rest": rest.tolist()}}}


def test_router_findings_criteria(tmp_path):
    rng = np.random.default_rng(0)
    S = 24
    fixed_S = 2.3 + rng.normal(0, 0.2, S)
    oracle = view(synthetic_oracle(tmp_path / "o", {f"oracle_loss_k{k}": np.tile((fixed_S - 0.3)[:, None], (1, 4))
                                                    for k in range(5)}))
    near = fake_router_run(tmp_path / "near", {
        "budget-0.50": router_eval("budget", fixed_S + rng.normal(0, 0.005, S), 0.05, 0.2, rng, fixed_S)})
    f = routers_near_baselines(near, oracle)
    assert f.numbers["routers"][0]["gap_ratio_minus_0.8"]["lo"] > 0
    assert f.verdict == "inconclusive"  # no null control: the oracle's gap over fixed cannot be shown real
    assert routers_favour_late_layers(near).verdict == "reproduced"
    assert routers_early_tokens_more_big(near).verdict == "reproduced"
    closing = fake_router_run(tmp_path / "closing", {
        "budget-0.50": router_eval("budget", fixed_S - 0.25, -0.05, -0.2, rng, fixed_S)})
    assert routers_near_baselines(closing, oracle).verdict == "contradicted"  # closes most of the gap
    assert routers_favour_late_layers(closing).verdict == "contradicted"
    assert routers_early_tokens_more_big(closing).verdict == "contradicted"
    small = fake_router_run(tmp_path / "small", {"budget-0.50": router_eval("budget", fixed_S, 0.01, 0.2, rng, fixed_S)})
    assert routers_early_tokens_more_big(small).verdict == "inconclusive"  # clear, but below the paper's 0.02
    none = RunData(tmp_path / "o")
    assert routers_near_baselines(none, oracle).verdict is None and routers_favour_late_layers(none).verdict is None


# ----------------------------------------------------------------------------- on a real run folder


@pytest.fixture(scope="module")
def oracle_only_run(tiny_run, tmp_path_factory):
    """The tiny run with one shared-context oracle on 256 tokens and nothing else (no routers, no skip study)."""
    out = tmp_path_factory.mktemp("report") / "tiny"
    shutil.copytree(tiny_run, out, symlinks=True)
    shutil.rmtree(out / "oracle", ignore_errors=True)
    shutil.rmtree(out / "routers", ignore_errors=True)
    run_oracle_command(out, max_tokens=256, progress=False)
    return out


def test_report_without_routers_or_skip_study(oracle_only_run):
    index = write_report(oracle_only_run)
    res = json.loads((oracle_only_run / "report" / "results.json").read_text())
    assert res["figures"] == ["findings", "training", "ppl_vs_budget", "oracle_usage", "position_budgets",
                              "token_losses", "difficulty_ranking"]
    assert index.read_text().count("data:image/png;base64,") == 7
    verdict = {f["id"]: f["verdict"] for f in res["findings"]}
    for absent in ("skip_not_early_exit", "routers_near_baselines", "routers_favour_late_layers",
                   "routers_early_tokens_more_big"):
        assert verdict[absent] is None
    assert verdict["one_big_beats_all_big"] in VERDICTS
    assert res["evaluation"]["contexts"] == ["shared"] and res["routers"] == [] and res["skip_study"] is None
    assert "not tested" in index.read_text() and "not tested" in (oracle_only_run / "report" / "report.md").read_text()


def test_a_barely_trained_run_carries_the_smoke_test_banner(oracle_only_run):
    """The 30-step tiny model is worse than a unigram model of its training tokens: its report says so."""

    write_report(oracle_only_run)
    res = json.loads((oracle_only_run / "report" / "results.json").read_text())
    q = res["model_quality"]
    table = pq.read_table(oracle_only_run / "oracle" / "SB-shared" / "per_token.parquet")
    counts = np.bincount(np.asarray(load_tokens(oracle_only_run, "train")), minlength=512) + 1.0
    unigram = math.exp(-np.log(counts[table.column("target").to_numpy()] / counts.sum()).mean())
    assert q["unigram_ppl"] == pytest.approx(unigram, rel=1e-4) and q["ratio"] >= 0.8 and q["smoke_test"] is True
    for page in ("report.md", "index.html"):
        assert "SMOKE TEST" in (oracle_only_run / "report" / page).read_text()


def test_difficulty_matches_the_oracle_table(oracle_only_run):
    write_report(oracle_only_run)
    report = oracle_only_run / "report"
    d = json.loads((report / "difficulty.json").read_text())
    per_token = pq.read_table(oracle_only_run / "oracle" / "SB-shared" / "per_token.parquet").to_pydict()
    table = pq.read_table(report / "difficulty.parquet").to_pydict()
    k = d["k_ref"]
    assert k == 2 and d["tokens"] == len(per_token["token"]) == 256
    small, oracle = np.array(per_token["loss_all_small"]), np.array(per_token[f"oracle_loss_k{k}"])
    np.testing.assert_allclose(table[f"gap_k{k}"], small - oracle, rtol=1e-6, atol=1e-6)
    want = spearman(small.astype(np.float64), small - oracle.astype(np.float64))
    assert d["spearman_small_loss_vs_gap"] == pytest.approx(want, abs=1e-5)
    gaps = [t["gap"] for t in d["top_by_gap"]]
    assert gaps == sorted(gaps, reverse=True) and gaps[0] == pytest.approx(float((small - oracle).max()), abs=1e-3)
    assert [t["loss_rank"] for t in d["top_by_loss"]] == list(range(1, len(d["top_by_loss"]) + 1))
    assert all("[" in t["text"] for t in d["top_by_gap"])  # decoded text with the target marked
    assert 0.0 <= d["high_loss_low_gain_share"] <= 1.0 and 0.0 <= d["top_decile_overlap"] <= 1.0
    html = (report / "index.html").read_text()
    assert html.count('<div class="toks">') == 4  # all small, all big, oracle, gap on the sample text


def test_figures_are_deterministic_png_without_software_tag(oracle_only_run):
    a, b = png_bytes(fig_ppl_vs_budget(oracle_only_run)), png_bytes(fig_ppl_vs_budget(oracle_only_run))
    assert a == b and a.startswith(b"\x89PNG") and b"matplotlib" not in a


def test_report_on_a_run_without_any_oracle(tiny_run, tmp_path):
    out = tmp_path / "bare"
    shutil.copytree(tiny_run, out, symlinks=True)
    shutil.rmtree(out / "oracle", ignore_errors=True)
    shutil.rmtree(out / "routers", ignore_errors=True)
    write_report(out)
    res = json.loads((out / "report" / "results.json").read_text())
    assert res["figures"] == ["training"] and res["difficulty"] is None  # the training curve needs no oracle
    assert all(f["verdict"] is None for f in res["findings"]) and res["verdicts"]["tested"] == 0
    with pytest.raises(ValueError, match="does not exist"):
        write_report(tmp_path / "missing")


def test_a_finding_registered_from_outside_is_decided_and_reported(oracle_only_run, monkeypatch):
    """docs/ARCHITECTURE.md's "to add a finding": one registry entry. A finding registered here (all big
    beats all small, per context) is decided on the run with its interval and gated by the null like the
    paper's: this run has no null control, so it cannot be "reproduced"."""
    from duollm.analysis.evidence import gain
    from duollm.analysis.findings import FINDINGS, Finding, FindingCheck, decide

    def big_beats_small(ev):
        claim, criterion = "All big beats all small.", "effect = relative perplexity gain of all-big over all-small"
        if ev.sweep is None:
            return Finding("big_beats_small", claim, criterion, None, context=ev.context)
        big, small = ev.sweep.seq_loss("loss_all_big"), ev.sweep.seq_loss("loss_all_small")
        return decide("big_beats_small", claim, criterion, lambda idx: gain(big[idx], small[idx]), ev.sweep.S,
                      context=ev.context)

    monkeypatch.setitem(FINDINGS, "big_beats_small", FindingCheck("big_beats_small", big_beats_small, per_context=True))
    write_report(oracle_only_run)
    res = json.loads((oracle_only_run / "report" / "results.json").read_text())
    mine = [f for f in res["findings"] if f["id"] == "big_beats_small"]
    assert len(mine) == 1 and mine[0]["context"] == "shared" and mine[0]["verdict"] in ("inconclusive", "contradicted")
    e = mine[0]["effect"]
    assert e["lo"] <= e["value"] <= e["hi"]
    if e["lo"] > 0:  # an effect whose interval excludes zero, without a null: not evidence (DESIGN 4.4a)
        assert mine[0]["numbers"]["without_null"].startswith("no null control")
    assert "All big beats all small." in (oracle_only_run / "report" / "index.html").read_text()


def test_a_report_killed_while_writing_leaves_the_old_report_whole(oracle_only_run, monkeypatch):
    """Issue 28, item 19: `report` killed as it replaced its files left old and new files mixed (results.json
    new, index.html old). The report is written into a folder of its own and swapped in whole."""
    import hashlib

    import duollm.analysis.report as report

    write_report(oracle_only_run)

    def digest(folder):
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    before = digest(oracle_only_run / "report")
    real = report.atomic_write_text

    def killed_at_the_page(path, text):
        if Path(path).name == "index.html":
            raise KeyboardInterrupt
        real(path, text)

    monkeypatch.setattr(report, "atomic_write_text", killed_at_the_page)
    monkeypatch.setattr(report, "render_markdown", lambda res, pngs: "a newer report\n")  # differs from the old one
    with pytest.raises(KeyboardInterrupt):
        write_report(oracle_only_run)
    assert digest(oracle_only_run / "report") == before
    assert not [p for p in oracle_only_run.iterdir() if p.name.startswith(".report")]


def test_the_studys_results_reach_tensorboard_and_wandb(oracle_only_run, monkeypatch):
    """Issue 28, item 6: no oracle, router or findings result reached TensorBoard or W&B. The report's headline
    numbers become scalars (TensorBoard) and summary values (W&B), its figures images, in the run's own runs."""
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from duollm.config import load_run_config
    from duollm.train.tracking import publish_results

    write_report(oracle_only_run)
    cfg = load_run_config(oracle_only_run)
    cfg.train.tensorboard, cfg.train.wandb = True, True
    logged = {}

    class Run:
        summary = {}

        def log(self, data, step=None):
            logged.update(data)

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kwargs: logged.update(init=kwargs) or Run())
    publish_results(oracle_only_run, cfg, step=30)
    acc = EventAccumulator(str(oracle_only_run / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])
    assert "study/oracle_ppl/shared/k2" in scalars and "study/verdicts/tested" in scalars
    assert any(t.startswith("study/finding/one_big_beats_all_big") for t in scalars)
    assert "report/ppl_vs_budget" in images and acc.Scalars("study/oracle_ppl/shared/k2")[0].step == 30
    res = json.loads((oracle_only_run / "report" / "results.json").read_text())
    k2 = next(b for b in res["oracle"][0]["budgets"] if b["k"] == 2)
    assert Run.summary["study/oracle_ppl/shared/k2"] == pytest.approx(k2["oracle_ppl"])
    assert "report/ppl_vs_budget" in logged and logged["init"]["resume"] == "allow"
    assert logged["init"]["id"] == json.loads((oracle_only_run / "wandb_run.json").read_text())["id"]
