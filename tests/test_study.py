"""``duollm run`` end to end on the tiny preset: stages, interruption and resume, the report (issue 5)."""

import base64
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import cli

import duollm.oracle.command
import duollm.oracle.runner
import duollm.routers.command
import duollm.routers.evaluate
import duollm.train.loop
from duollm.checkpoint import load_model, trained_step
from duollm.config import load_config, load_run_config
from duollm.stats import VERDICTS
from duollm.study.run import Study, resolve_config, run_study
from duollm.study.settings import router_budgets, validate_study

QUIET = lambda *a, **k: None



class Calls:
    """Records the calls the stages make into the library (training, an oracle, a router), each as the
    keywords a reader checks: an oracle by its spec, a router by its config."""

    def __init__(self, mp: pytest.MonkeyPatch):
        self.log: list[tuple[str, dict]] = []
        mp.setattr(duollm.study.run, "pretrain", self._wrap("pretrain", lambda *a, **k: k))
        mp.setattr(duollm.study.run, "oracle_of_run", self._wrap("oracle", lambda run, spec, **k: {
            "context": spec.context, "budgets": spec.space.budgets, "options": spec.space.options,
            "split": k.get("split", "validation"), "schedules_only": spec.schedules_only, "dtype": spec.dtype}))
        mp.setattr(duollm.study.run, "train_router", self._wrap("router", lambda run, cfg, **k: {
            "resume": k["resume"], "method": cfg.method, "options": cfg.options, "target": cfg.target,
            "oracle": cfg.oracle}))

    def _wrap(self, name, describe):
        fn = getattr(duollm.study.run, {"oracle": "oracle_of_run", "router": "train_router"}.get(name, name))

        def wrapped(*args, **kwargs):
            self.log.append((name, describe(*args, **kwargs)))
            return fn(*args, **kwargs)
        return wrapped

    def count(self, name: str) -> int:
        return sum(n == name for n, _ in self.log)


class Once:
    """Raise KeyboardInterrupt (a kill) the first time ``when(*args)`` holds, then call through."""

    def __init__(self, fn, when):
        self.fn, self.when, self.fired = fn, when, False

    def __call__(self, *args, **kwargs):
        if not self.fired and self.when(*args, **kwargs):
            self.fired = True
            raise KeyboardInterrupt
        return self.fn(*args, **kwargs)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def study(tiny_run, tmp_path_factory):
    """The tiny study on a copy of the trained tiny run, killed twice on the way and rerun.

    Pass 1 is killed inside the frozen-context oracle, after its first chunk was saved; pass 2
    inside the first router, after its training saved a checkpoint but before its evaluation;
    pass 3 finishes. Returns the run folder and what each pass called."""
    out = tmp_path_factory.mktemp("study") / "tiny"
    shutil.copytree(tiny_run, out, symlinks=True)
    passes = []
    with pytest.MonkeyPatch.context() as mp:
        calls = Calls(mp)
        chunks = []

        def frozen_second_chunk(model, plan, *a, **k):
            if plan.spec.context == "frozen":
                chunks.append(1)
            return len(chunks) == 2

        mp.setattr(duollm.oracle.runner, "compute_chunk", Once(duollm.oracle.runner.compute_chunk, frozen_second_chunk))
        with pytest.raises(KeyboardInterrupt):
            run_study("tiny", None, out, log=QUIET)
        passes.append(list(calls.log))

        calls.log.clear()
        real = duollm.routers.evaluate.evaluate_router
        mp.setattr(duollm.routers.evaluate, "evaluate_router", Once(real, lambda *a, **k: True))
        with pytest.raises(KeyboardInterrupt):
            run_study("tiny", None, out, log=QUIET)
        passes.append(list(calls.log))

        calls.log.clear()
        printed = []
        index = run_study("tiny", None, out, log=printed.append)
        passes.append(list(calls.log))
    return {"out": out, "passes": passes, "index": index, "printed": printed}


def names(calls, fn):
    return [kw for n, kw in calls if n == fn]


def test_killed_stages_resume_and_finished_ones_are_not_recomputed(study):
    out = study["out"]
    first, second, third = study["passes"]
    # pass 1: the run was trained already (reused, not retrained); killed in the frozen oracle
    assert not names(first, "pretrain")
    assert [kw["context"] for kw in names(first, "oracle")] == ["shared", "frozen"]
    assert {kw["dtype"] for kw in names(first, "oracle")} == {"float32"}  # study.dtype
    # pass 2: the shared oracle is not recomputed; the frozen one continues from its saved chunk; then
    # the sequential oracle, the skip study and the imitation routers' labels on training tokens
    oracles = names(second, "oracle")
    assert [kw["context"] for kw in oracles] == ["frozen", "sequential", "shared", "shared"]
    assert oracles[1]["budgets"] == (0, 1, 2) and oracles[2]["options"] == "B_"
    assert oracles[3]["split"] == "train" and oracles[3]["budgets"] == (1, 2, 3)
    frozen = json.loads((out / "oracle" / "SB-frozen-B" / "run.json").read_text())
    assert frozen["chunks"] == 2 and frozen["chunks_resumed"] == 1
    assert len(names(second, "router")) == 1  # killed in the first router
    # pass 3: no training, no oracle of the run; the killed router resumes from its checkpoint; then the
    # null control's stages on RUN/null, only what a finding uses: the paper's router at L/2 and its reference oracle
    assert not names(third, "pretrain")
    null_oracles = [(n, kw) for n, kw in third if n == "oracle"]
    assert [kw["context"] for _, kw in null_oracles] == ["shared"]
    assert [kw["schedules_only"] for _, kw in null_oracles] == [False]
    routers = names(third, "router")
    assert routers[0]["resume"] is True and routers[0]["method"] == "budget"
    assert all(r["resume"] is False for r in routers[1:])
    cfg = load_config("tiny")
    # budget, imitation and value at each budget, one big-or-skip mixture, the null's
    assert len(routers) == len(router_budgets(cfg)) * 3 + 1 + 1
    # imitation learned from the training-split table only: its eval.json says so
    for k in router_budgets(cfg):
        ev = json.loads((out / "routers" / f"imitation-{k / 4:.2f}" / "eval.json").read_text())
        assert ev["labels"] == "train"
    mixture = [r for r in routers if r["options"] == "B_"]
    assert len(mixture) == 1 and mixture[0]["target"] == 0.5 and mixture[0]["oracle"] == ""
    assert routers[-1]["method"] == "budget" and routers[-1]["target"] == 0.5


def test_rerun_skips_every_finished_stage_and_redoes_stale_ones(study):
    out = study["out"]
    with pytest.MonkeyPatch.context() as mp:
        calls = Calls(mp)
        printed = []
        run_study(None, None, out, log=printed.append)  # an existing run: its own config
        assert not calls.log
        assert sum("already done, skipped" in line for line in printed) == len(Study(load_config("tiny"), out).stages()) - 1
        # outputs recorded as made from other inputs are recomputed, and only they
        marker = out / "study" / "stages" / "oracle-SB-shared.json"
        rec = json.loads(marker.read_text())
        rec["key"]["step"] = -1
        marker.write_text(json.dumps(rec))
        run_study(None, None, out, log=QUIET)
        assert [(n, kw.get("context")) for n, kw in calls.log] == [("oracle", "shared")]


def test_progress_lines_and_results_table(study):
    printed = "\n".join(study["printed"])
    assert "[1/" in printed and "elapsed" in printed and "ETA" in printed
    assert "oracle shared" in printed and "oracle frozen" in printed and "tested findings" in printed
    assert printed.rstrip().endswith(str(study["index"]))


def test_report_files_with_embedded_figures_and_findings(study):
    report = study["out"] / "report"
    assert study["index"] == report / "index.html"
    html = (report / "index.html").read_text()
    res = json.loads((report / "results.json").read_text())
    md = (report / "report.md").read_text()
    assert set(res["figures"]) == {"findings", "training", "ppl_vs_budget", "oracle_usage", "router_usage", "router_routes",
                                   "router_training", "position_budgets", "token_losses", "difficulty_ranking",
                                   "skip_vs_early_exit"}
    images = html.split('src="data:image/png;base64,')[1:]
    assert len(images) == len(res["figures"])
    for img in images:
        assert base64.b64decode(img.split('"', 1)[0]).startswith(b"\x89PNG\r\n\x1a\n")
    # self-contained: figures embedded, scripts inline, nothing fetched from anywhere
    assert 'src="figures/' not in html and "<script src" not in html and "http://" not in html and "https://" not in html
    for name in res["figures"]:
        assert f"![{name}](figures/{name}.png)" in md and (report / "figures" / f"{name}.png").is_file()
    # model, data, tokens and context policy are stated
    assert res["model"]["preset"] == "tiny" and res["data"]["spec"] == "builtin:pydoc-topics"
    assert res["evaluation"]["tokens"] == 512 and res["evaluation"]["contexts"] == ["shared", "frozen"]
    for text in ("tiny preset", "builtin:pydoc-topics", "512", "shared", "frozen"):
        assert text in html and text in md
    ids = [f["id"] for f in res["findings"]]
    assert {"oracle_u_shape", "one_big_beats_all_big", "big_layers_by_budget", "skip_not_early_exit",
            "constant_budget_best", "routers_near_baselines", "routers_favour_late_layers",
            "routers_early_tokens_more_big", "difficulty_not_raw_loss", "layers_consistently_skipped"} == set(ids)
    # every check had what it needs on this run, so each got a verdict, an effect with its interval, its H0, its
    # registry threshold, a family-adjusted p and a minimum detectable effect
    assert all(f["verdict"] in VERDICTS and f["h0"] and f["threshold"]["statistic"]
               for f in res["findings"])
    assert all(f["effect"]["lo"] <= f["effect"]["value"] <= f["effect"]["hi"] for f in res["findings"])
    assert all(f["p_adjusted"] >= f["p"] and f["mde"] >= 0 for f in res["findings"])  # 0: no spread (a router = fixed)
    # the untrained model is the null of what routers learn only: those two findings carry it
    with_null = sorted(f["id"] for f in res["findings"] if "minus_null" in f["effect"])
    assert with_null == ["routers_early_tokens_more_big", "routers_favour_late_layers"]
    assert res["criteria"]["version"] == 2 and "fingerprint" in res["criteria"]
    n = res["verdicts"]
    assert n["tested"] == len(res["findings"]) == n["reproduced"] + n["contradicted"] + n["inconclusive"]
    assert f"Of {n['tested']} tested findings, {n['reproduced']} reproduced" in html
    # the routers were evaluated on the oracle's tokens (eval.max_tokens is 1024, the study scores 512)
    assert len(res["routers"]) == 10 and all(r["tokens"] == 512 for r in res["routers"])
    assert all(r["oracle_tokens"] == 512 for r in res["routers"] if r["options"] == "SB")
    # the value routers spend exactly k bigs per token (their budget is enforced)
    assert all(r["big_fraction"] == r["target"] for r in res["routers"] if r["method"] == "value")
    # ... with the per-sequence evidence the router findings resample (16 sequences of 32 tokens)
    for path in sorted((study["out"] / "study" / "routers").glob("*.json")):
        if "oracle" not in json.loads(path.read_text()):
            assert path.stem == "budget-0.50-B_"  # the big-or-skip mixture: no oracle of its options in the study
            continue
        comp = json.loads(path.read_text())["oracle"]
        ps = comp["per_sequence"]
        assert len(ps["loss"]) == len(ps["big_by_layer"]) == len(ps["big_early"]) == 16 and len(ps["big_by_layer"][0]) == 4
        # the headline share of the oracle's gain recovered, recomputed from the per-sequence evidence
        loss_S, fixed_S, oracle_S = (np.array(ps[key]) for key in ("loss", "fixed_loss", "oracle_loss"))
        want = (fixed_S.mean() - loss_S.mean()) / (fixed_S.mean() - oracle_S.mean())
        assert comp["recovered"]["value"] == pytest.approx(want, abs=1e-3)
        assert comp["recovered"]["lo"] <= comp["recovered"]["value"] <= comp["recovered"]["hi"]
    # the gap, decomposed: every budget with a gain, the label-free oracles and the routers at their k
    gap = {r["k"]: r for r in res["gap"]}
    assert sorted(gap) == [1, 2, 3] and all(r["confidence"]["recovered"]["value"] is not None for r in gap.values())
    assert {x["name"] for r in gap.values() for x in r["routers"]} == {r["name"] for r in res["routers"] if r["options"] == "SB"}
    # ... each also at its realised compute (the oracle and fixed curves interpolated there; undefined for a
    # router that realised all-small or all-big, where the oracle gains nothing over fixed)
    for x in (x for r in gap.values() for x in r["routers"]):
        assert (x["recovered_matched"]["value"] is None) == (x["big_fraction"] in (0.0, 1.0)), x
    assert "The oracle's gain, decomposed" in md and res["gain_made_of"].startswith("At k = 2")
    assert all(r["baseline"] == "out-of-sample" and r["count_null"] for r in gap.values())
    assert res["difficulty"]["tokens"] == 512 and (report / "difficulty.parquet").is_file()


def test_report_regenerates_byte_identically(study):
    from duollm.analysis.report import write_report

    report = study["out"] / "report"
    before = digest(report)
    assert write_report(study["out"]) == report / "index.html"
    assert digest(report) == before
    assert str(study["out"]) not in (report / "index.html").read_text()  # no absolute paths


def test_study_config_is_strict():
    for override, fragment in (("study.contexts=shared,fancy", "study.contexts"), ("study.router_targets=1/3,2", "(0, 1]"),
                               ("study.router_methods=budget,magic", "magic"), ("study.skip_fraction=1.0", "skip_fraction"),
                               ("study.reference=BBX", "pattern"), ("study.colour=red", "unknown config key study.colour")):
        with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            validate_study(load_config("tiny", [override]))
    cfg = load_config("cpu")
    assert router_budgets(cfg) == [4, 6, 8]  # the paper's budgets for 12 layers


def test_the_null_control_is_the_model_at_initialisation_on_the_same_tokens(study):
    import pyarrow.parquet as pq
    import torch

    from duollm import rundir
    from duollm.model.model import DuoModel

    out = study["out"]
    null = rundir.null_dir(out)
    cfg = load_run_config(out)
    torch.manual_seed(cfg.train.seed)
    init = DuoModel(cfg.model)
    model, _ = load_model(null)
    assert trained_step(null) == 0
    assert all(torch.equal(a, b) for a, b in zip(init.state_dict().values(), model.state_dict().values()))
    real = pq.read_table(out / "oracle" / "SB-shared" / "per_token.parquet", columns=["token", "target"])
    nul = pq.read_table(null / "oracle" / "SB-shared" / "per_token.parquet", columns=["token", "target"])
    assert real.equals(nul)  # the same tokens, in the same order
    res = json.loads((out / "report" / "results.json").read_text())
    assert res["null"]["oracle"]["all_big_ppl"] > 400  # near the 512-token uniform: an untrained model
    assert "Null control" in (out / "report" / "report.md").read_text()


def test_existing_run_keeps_its_config_and_unfinished_training_resumes(tiny_run, tmp_path):
    out = tmp_path / "tiny"
    shutil.copytree(tiny_run, out, symlinks=True)
    with pytest.raises(ValueError, match="already holds another run"):
        resolve_config("cpu", None, out)
    with pytest.raises(ValueError, match="data.spec"):
        resolve_config(None, "builtin:pydoc", out)
    with pytest.raises(ValueError, match="model.d_model"):
        resolve_config(None, None, out, ["model.d_model=64"])
    assert resolve_config(None, None, out, ["study.router_steps=5"]).study.router_steps == 5
    cfg = resolve_config("tiny", None, out, ["train.steps=35"])  # more steps than trained: continue
    train = Study(cfg, out, QUIET).stages()[0]
    assert train.id == "train" and not train.complete()
    with pytest.MonkeyPatch.context() as mp:
        calls = Calls(mp)
        train.run(False)
        assert calls.log[0][1] == {"resume": True, "log": QUIET}
    assert train.complete() and Study(cfg, out).trained_step() == 35


def test_the_null_control_can_be_switched_off(tmp_path):
    on = [s.id for s in Study(load_config("tiny"), tmp_path / "a", QUIET).stages()]
    off = [s.id for s in Study(load_config("tiny", ["study.null=false"]), tmp_path / "b", QUIET).stages()]
    null = ["null", "null-oracle-SB-shared", "null-router-budget-0.50"]  # what the router findings' null needs
    assert [s for s in on if s.startswith("null")] == null
    assert not [s for s in off if s.startswith("null")] and len(off) == len(on) - len(null)


def test_an_untrained_model_on_random_text_reproduces_nothing_over_seeds(tmp_path):
    """The defect the null control exists for: without it an untrained model "reproduces" the U-shape,
    one-big-beats-all-big, constant > falling/rising and more (issue 11). Two seeds, each barely trained
    on uniformly random tokens: every finding is inconclusive or contradicted, and the report tabulates
    the seeds."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), 3)) for _ in range(300)]
    corpus = tmp_path / "random.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(4000)))
    out = tmp_path / "run"
    run_study("tiny", f"file:{corpus}", out, ["train.steps=2", "study.seeds=2", "study.router_methods=budget",
                                              "study.router_targets=1/2"], log=QUIET)
    res = json.loads((out / "report" / "results.json").read_text())
    assert res["verdicts"]["tested"] >= 8 and res["verdicts"]["reproduced"] == 0, \
        [(f["id"], f["verdict"], f["effect"]) for f in res["findings"] if f["verdict"] == "reproduced"]
    seeds = res["seeds"]
    assert seeds["seeds"] == [1337, 1338] and (out / "seeds" / "seed-1338" / "report" / "results.json").is_file()
    for row in seeds["findings"]:
        assert "reproduced" not in row["verdicts"], row
        assert len(row["verdicts"]) == 2
    u = next(r for r in seeds["findings"] if r["id"] == "oracle_u_shape")
    values = [e["value"] for e in u["effects"]]
    assert u["mean"] == pytest.approx(np.mean(values), abs=1e-4) and u["sd"] == pytest.approx(np.std(values, ddof=1), abs=1e-4)
    assert "Across 2 training seeds" in (out / "report" / "report.md").read_text()


def test_compare_lists_every_compared_router_with_its_recovered_share(study, tmp_path):
    from conftest import assert_one_line_error, cli

    out = study["out"]
    res = json.loads((out / "report" / "results.json").read_text())
    listing = json.loads(cli("compare", out, "--json").stdout)
    rows, (run,) = listing["routers"], listing["runs"]
    assert run["steps"] == res["training"]["steps"] and run["verdicts"] == res["verdicts"]
    assert run["oracle_ppl"] < run["fixed_ppl"] and run["val_all_big"] is not None
    gap_routers = {x["name"]: x for r in res["gap"] for x in r["routers"]}
    listed = {r["method"]: r for r in rows if r["method"] in gap_routers}
    assert set(listed) == set(gap_routers)  # every router the gap decomposes (the skip mixture has no oracle)
    for name, r in listed.items():
        assert r["recovered"] == gap_routers[name]["recovered"]
        assert r["recovered_matched"] == gap_routers[name]["recovered_matched"]
    assert {"confidence oracle", "previous-token oracle"} <= {r["method"] for r in rows}
    table = cli("compare", out).stdout
    assert "at its compute" in table and "val loss all-big" in table and all(name in table for name in gap_routers)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(cli("compare", empty, check=False), "no oracle")


def test_info_lists_what_the_run_holds_and_whether_the_report_is_current(study):
    import os

    from conftest import cli

    out = study["out"]
    inv = json.loads(cli("info", out, "--json").stdout)["run"]
    assert inv["trained_steps"] == inv["train_steps"] == 30 and set(inv["validation"]) == {"val/all_big", "val/all_small",
                                                                                          "val/random"}
    assert {"SB-shared", "SB-frozen-B", "SB-sequential", "SB-shared-train"} <= {o["name"] for o in inv["oracles"]}
    assert all(o["complete"] for o in inv["oracles"])
    assert len(inv["routers"]) == 10 and inv["null"] and inv["report"] == "current"
    text = cli("info", out).stdout
    assert "trained 30 of 30 steps" in text and "report: current" in text and "budget-0.50" in text
    ev = out / "routers" / "budget-0.50" / "eval.json"
    before = ev.stat()
    os.utime(ev, (before.st_atime, before.st_mtime + 3600))  # an output newer than the report
    try:
        assert json.loads(cli("info", out, "--json").stdout)["run"]["report"] == "stale"
    finally:
        os.utime(ev, (before.st_atime, before.st_mtime))


# ----------------------------------------------------------------------------- the page in a real browser (issue 30)


def chromium_page(viewport=(1400, 900)):
    """A Playwright page in Debian's chromium, and the errors the page reports; skips where there is none."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    return sync_api, exe, viewport


def open_page(p, exe, viewport, path: Path):
    browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.resolve().as_uri())
    return browser, page, errors


def visible_rows(page, table_id: str) -> list[str]:
    return page.eval_on_selector_all(f"#{table_id} tbody tr", "rs => rs.filter(r => !r.hidden).map(r => r.textContent)")


def test_report_in_a_real_browser(study, tmp_path):
    """The default page in headless chromium: no script errors; the verdict summary and the contents on the first
    screen; every figure loaded, beside its tables; sorting and filtering change the visible rows; the token explorer
    filters to the 20 hardest tokens with their oracle patterns. Screenshots go to $DUOLLM_SCREENSHOTS or tmp_path."""
    import os

    sync_api, exe, viewport = chromium_page()
    shots = Path(os.environ.get("DUOLLM_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser, page, errors = open_page(p, exe, viewport, study["out"] / "report" / "index.html")
        page.screenshot(path=str(shots / "report-first-screen.png"))
        for selector in ("#summary-table", "nav.toc"):
            box = page.locator(selector).bounding_box()
            assert box is not None and box["y"] < viewport[1], selector
        assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        n_images = page.evaluate("document.images.length")
        assert n_images == len(json.loads((study["out"] / "report" / "results.json").read_text())["figures"])
        for pair in page.locator(".pair").all():  # a figure and its tables side by side
            fig, tables = pair.locator(".figs").bounding_box(), pair.locator(".tables").bounding_box()
            assert fig["x"] + fig["width"] <= tables["x"] + 1 and fig["y"] < tables["y"] + tables["height"]
        # sorting: the MDE column, ascending then descending
        before = visible_rows(page, "summary-table")
        page.locator("#summary-table th", has_text="MDE").click()
        mde = page.eval_on_selector_all("#summary-table tbody tr", "rs => rs.map(r => parseFloat(r.cells[5].textContent))")
        assert mde == sorted(mde) and visible_rows(page, "summary-table") != before
        page.locator("#summary-table th", has_text="MDE").click()
        assert page.eval_on_selector_all("#summary-table tbody tr", "rs => rs.map(r => parseFloat(r.cells[5].textContent))") \
            == sorted(mde, reverse=True)
        # filtering: only the rows that hold the text stay visible
        page.locator('input[data-table="summary-table"]').fill("frozen")
        rows = visible_rows(page, "summary-table")
        assert 0 < len(rows) < len(before) and all("frozen" in r for r in rows)
        # the token explorer: the 20 hardest tokens with their oracle patterns, the rest of the text dimmed
        page.locator("#tx-hardest").click()
        page.locator("#explorer").scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "report-token-explorer.png"))
        rows = page.eval_on_selector_all("#tx-table tbody tr", "rs => rs.map(r => Array.from(r.cells, c => c.textContent))")
        assert len(rows) == 20
        L = load_run_config(study["out"]).model.n_layers
        assert all(len(r[3]) == L and set(r[3]) <= set("SB") for r in rows)  # the oracle's pattern at the router's k
        header = page.eval_on_selector_all("#tx-table thead th", "hs => hs.map(h => h.textContent)")
        losses = [float(r[header.index("all-big")]) for r in rows]  # ranked by all-big's loss, highest first
        assert page.locator("#tx-rank").input_value() == "all-big" and losses == sorted(losses, reverse=True)
        n = page.evaluate("JSON.parse(document.getElementById('tx-data').textContent).n")
        assert page.locator("#tx-text span.dim").count() == n - 20
        page.locator("#tx-show").select_option("disagree")
        assert page.locator("#tx-table tbody tr").count() > 0  # a trained router and the oracle disagree somewhere
        assert errors == []
        browser.close()


def test_compare_html_puts_two_runs_side_by_side(study, tmp_path):
    sync_api, exe, viewport = chromium_page()
    out = tmp_path / "compare.html"
    proc = cli("compare", study["out"], study["out"] / "null", "--html", out)
    assert f"wrote {out}" in proc.stdout
    with sync_api.sync_playwright() as p:
        browser, page, errors = open_page(p, exe, viewport, out)
        assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        assert page.evaluate("document.images.length") == 2  # the findings and the shares, each run's intervals
        header = page.eval_on_selector_all("#t1 thead th", "hs => hs.map(h => h.textContent)")
        assert header[1:] == [f"{n}: {w}" for n in (study["out"].name, "null") for w in ("effect [95%]", "verdict")]
        assert visible_rows(page, "summary-table")[0].startswith(study["out"].name)
        assert errors == []
        browser.close()
