"""The analysis package: rank statistics, the findings' criteria, token difficulty, and a report that
copes with whatever the run folder holds (issue 5, DESIGN 4.4)."""

import json
import math
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from duollm.analysis.difficulty import rankdata, spearman
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
)
from duollm.analysis.report import write_report
from duollm.analysis.rundata import Oracle, RunData, early_exit_pattern, reference_budgets
from duollm.oracle.command import run_oracle_command

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


def sweep(ppl_by_k, all_big=10.0, big_share=None, position=None, context="shared"):
    L = len(ppl_by_k) - 1
    budgets = [{"k": k, "oracle_ppl": p, "oracle_big_share_by_layer": (big_share or {}).get(k, [k / L] * L)}
               for k, p in enumerate(ppl_by_k)]
    return Oracle(folder=None, summary={"budgets": budgets, "all_big_ppl": all_big, "context": context,
                                        "position_budgets": position or []})


def test_oracle_findings_criteria():
    u = sweep([12, 9.5, 9.0, 8.5, 8.0, 8.6, 8.8, 9.0, 9.4])  # L = 8, best at k = 4
    assert oracle_u_shape(u, 8).reproduced is True and oracle_u_shape(u, 8).numbers["k_best"] == 4
    falling = sweep([12, 11, 10, 9, 8.8, 8.6, 8.4, 8.2, 8.0])
    assert oracle_u_shape(falling, 8).reproduced is False
    edge = sweep([12, 8.0, 8.2, 8.5, 8.7, 8.8, 8.9, 9.0, 9.4])  # best at k = 1: rises all the way
    assert oracle_u_shape(edge, 8).reproduced is False
    late = sweep([12, 9.0, 8.9, 8.8, 8.7, 8.6, 8.5, 8.0, 9.4])  # best at k = 7 > 3L/4 = 6
    assert oracle_u_shape(late, 8).reproduced is False
    assert one_big_beats_all_big(u).reproduced is True  # 9.5 < 10
    assert one_big_beats_all_big(sweep([12, 10.5, 9.0], all_big=10.0)).reproduced is False
    assert oracle_u_shape(Oracle(None, {"budgets": []}), 8).reproduced is None

    late, early = [0.0, 0.0, 0.5, 0.5], [1.0, 1.0, 0.5, 0.5]  # L = 4: small k = 1, large k = 3
    assert reference_budgets(4) == {"small": 1, "middle": 2, "large": 3}
    ok = sweep([9, 8, 7, 8, 9], big_share={1: late, 3: early})
    assert big_layers_by_budget(ok, 4).reproduced is True
    assert big_layers_by_budget(sweep([9, 8, 7, 8, 9], big_share={1: early, 3: early}), 4).reproduced is False

    pos = lambda c, f, r: [{"name": "constant", "oracle_ppl": c, "schedule": "4->4"},  # noqa: E731
                           {"name": "falling", "oracle_ppl": f, "schedule": "6->2"},
                           {"name": "rising", "oracle_ppl": r, "schedule": "2->6"}]
    assert constant_budget_best(sweep([9, 8, 7], position=pos(7.0, 7.2, 7.5))).reproduced is True
    assert constant_budget_best(sweep([9, 8, 7], position=pos(7.3, 7.2, 7.5))).reproduced is False
    assert constant_budget_best(sweep([9, 8, 7])).reproduced is None


def skip_oracle(tmp_path, share, fixed, skips=2, L=4):
    folder = tmp_path / "oracle" / f"B_-skip{skips}-shared"
    folder.mkdir(parents=True)
    return Oracle(folder, {"skips": skips, "context": "shared", "budgets": [
        {"k": L - skips, "oracle_early_exit_share": share, "fixed_pattern": fixed, "oracle_ppl": 9.0, "fixed_ppl": 9.5,
         "oracle_skip_share_by_layer": [0.5] * L}]})


def test_skip_finding_criterion(tmp_path):
    assert early_exit_pattern(12, 6) == "BBBBBB______"
    assert skip_not_early_exit(skip_oracle(tmp_path / "a", 0.1, "B_B_"), 4).reproduced is True
    assert skip_not_early_exit(skip_oracle(tmp_path / "b", 0.1, "BB__"), 4).reproduced is False  # fixed = early exit
    assert skip_not_early_exit(skip_oracle(tmp_path / "c", 0.7, "B_B_"), 4).reproduced is False
    assert skip_not_early_exit(None, 4).reproduced is None


def fake_router_run(tmp_path, routers):
    for name, ev in routers.items():
        (tmp_path / "routers" / name).mkdir(parents=True)
        (tmp_path / "routers" / name / "eval.json").write_text(json.dumps(ev))
    return RunData(tmp_path)


def router_eval(method, ppl, per_layer_big, by_position, oracle_ppl=8.0, fixed=10.0):
    return {"method": method, "target": 0.5, "ppl": ppl, "big_fraction": 0.5, "per_layer_big": per_layer_big,
            "big_by_position": by_position, "oracle": {"k": 2, "oracle_ppl": oracle_ppl, "fixed_ppl": fixed,
                                                      "best_of_100_ppl": fixed, "random_mean_ppl": fixed + 0.5}}


def test_router_findings_criteria(tmp_path):
    near = fake_router_run(tmp_path / "near", {
        "budget-0.50": router_eval("budget", 9.8, [0.1, 0.2, 0.8, 0.9], [0.9, 0.5, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4]),
        "imitation-0.50": router_eval("imitation", 8.1, [0.9, 0.9, 0.1, 0.1], [0.1] * 8),  # not the paper's router
    })
    assert routers_near_baselines(near).reproduced is True
    assert routers_near_baselines(near).numbers["methods"] == "budget"
    assert routers_favour_late_layers(near).reproduced is True
    assert routers_early_tokens_more_big(near).reproduced is True
    far = fake_router_run(tmp_path / "far", {
        "budget-0.50": router_eval("budget", 8.2, [0.9, 0.8, 0.2, 0.1], [0.4, 0.4, 0.4, 0.4, 0.5, 0.5, 0.5, 0.5])})
    assert routers_near_baselines(far).reproduced is False
    assert routers_favour_late_layers(far).reproduced is False
    assert routers_early_tokens_more_big(far).reproduced is False
    none = RunData(tmp_path)
    assert routers_near_baselines(none).reproduced is None and routers_favour_late_layers(none).reproduced is None


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
    assert res["figures"] == ["ppl_vs_budget", "oracle_usage", "position_budgets", "token_losses", "difficulty_ranking"]
    assert index.read_text().count("data:image/png;base64,") == 5
    verdict = {f["id"]: f["reproduced"] for f in res["findings"]}
    for absent in ("skip_not_early_exit", "routers_near_baselines", "routers_favour_late_layers",
                   "routers_early_tokens_more_big"):
        assert verdict[absent] is None
    assert isinstance(verdict["one_big_beats_all_big"], bool)
    assert res["evaluation"]["contexts"] == ["shared"] and res["routers"] == [] and res["skip_study"] is None
    assert "not tested" in index.read_text() and "not tested" in (oracle_only_run / "report" / "report.md").read_text()


def test_a_barely_trained_run_carries_the_smoke_test_banner(oracle_only_run):
    """The 30-step tiny model is worse than a unigram model of its training tokens: its report says so."""
    from duollm import rundir

    write_report(oracle_only_run)
    res = json.loads((oracle_only_run / "report" / "results.json").read_text())
    q = res["model_quality"]
    table = pq.read_table(oracle_only_run / "oracle" / "SB-shared" / "per_token.parquet")
    counts = np.bincount(np.asarray(rundir.load_tokens(oracle_only_run, "train")), minlength=512) + 1.0
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
    assert res["figures"] == [] and res["difficulty"] is None
    assert all(f["reproduced"] is None for f in res["findings"]) and res["reproduced"]["tested"] == 0
    with pytest.raises(ValueError, match="does not exist"):
        write_report(tmp_path / "missing")
