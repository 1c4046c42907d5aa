"""The analysis package: rank statistics, token difficulty, and a report that copes with whatever the run
folder holds (issue 5, DESIGN 4.4). The findings' criteria: tests/test_findings.py."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from duollm.analysis.difficulty import rankdata, spearman
from duollm.analysis.figures import fig_ppl_vs_budget, png_bytes
from duollm.analysis.report import write_report
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
    """docs/ARCHITECTURE.md's "to add a finding": one registry entry with its frozen criterion. A finding
    registered here (all big beats all small, per context) is decided on the run with its interval, joins the
    family's Holm correction and is printed with its H0 and threshold."""
    from duollm.analysis.evidence import gain
    from duollm.analysis.findings import FINDINGS, Criterion, FindingCheck, one_part, untested
    from duollm.stats import estimate

    crit = Criterion("big_beats_small", "All big beats all small.", "all-small is as good as all-big",
                     "relative perplexity gain of all-big over all-small", 0.0, 1, 0.01)

    def big_beats_small(ev):
        if ev.sweep is None:
            return untested(crit, "no sweep", ev.context)
        big, small = ev.sweep.seq_loss("loss_all_big"), ev.sweep.seq_loss("loss_all_small")
        return one_part(crit, estimate(lambda idx: gain(big[idx], small[idx]), ev.sweep.S), context=ev.context)

    monkeypatch.setitem(FINDINGS, "big_beats_small", FindingCheck("big_beats_small", big_beats_small, per_context=True))
    write_report(oracle_only_run)
    res = json.loads((oracle_only_run / "report" / "results.json").read_text())
    mine = [f for f in res["findings"] if f["id"] == "big_beats_small"]
    assert len(mine) == 1 and mine[0]["context"] == "shared" and mine[0]["verdict"] in VERDICTS
    e = mine[0]["effect"]
    assert e["lo"] <= e["value"] <= e["hi"] and mine[0]["p_adjusted"] >= mine[0]["p"]
    assert mine[0]["h0"] == "all-small is as good as all-big" and mine[0]["mde"] > 0
    page = (oracle_only_run / "report" / "index.html").read_text()
    assert "All big beats all small." in page and "all-small is as good as all-big" in page


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
