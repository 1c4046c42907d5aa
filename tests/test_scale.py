"""The scale axis (issue 29, item 1): sizes from the config, the frozen trend rule, and a study over two widths."""

import json

import pytest

from duollm.analysis.findings import CRITERIA, SCALE_RULE_VERSION, TRENDS, scale_rule_fingerprint, scale_trend
from duollm.config import load_config, load_run_config
from duollm.study.run import Study, run_study
from duollm.study.scale import Size, size_config, sizes
from duollm.study.settings import validate_study

QUIET = lambda *_: None


def test_sizes_scale_heads_and_ffns_with_the_width_and_steps_with_the_multiple():
    cfg = load_config("cpu", ["study.widths=64,128,256", "study.train_tokens=1,2"])
    assert [(s.d_model, s.steps_multiple) for s in sizes(cfg)] == [(d, x) for d in (64, 128, 256) for x in (1, 2)]
    small, big = size_config(cfg, Size(64, 1)), size_config(cfg, Size(256, 2))
    m = cfg.model  # 128 wide, 4 heads of 32, FFN 512 / 32
    assert (small.model.d_model, small.model.n_heads, small.model.d_ff_big, small.model.d_ff_small) == (64, 2, 256, 16)
    assert (big.model.d_model, big.model.n_heads, big.model.d_ff_big, big.model.d_ff_small) == (256, 8, 1024, 64)
    assert big.model.n_layers == m.n_layers and big.model.vocab_size == m.vocab_size
    assert (small.train.steps, big.train.steps) == (cfg.train.steps, 2 * cfg.train.steps)
    assert (big.study.widths, big.study.train_tokens, big.study.seeds, big.study.null) == ("", "", 1, True)
    assert sizes(load_config("cpu")) == [Size(128, 1)]  # off: the run's own size only


@pytest.mark.parametrize("sets, fragment", [
    (["study.widths=48"], "48 is not a multiple of the head dimension 32"),
    (["study.widths=64,x"], "'x' is not a whole number"),
    (["study.train_tokens=0"], "study.train_tokens: 0 must be positive"),
])
def test_a_bad_scale_axis_is_one_line(sets, fragment):
    with pytest.raises(ValueError, match=fragment):
        validate_study(load_config("cpu", sets))


def test_the_study_plans_one_stage_per_other_size(tmp_path):
    ids = [s.id for s in Study(load_config("tiny", ["study.widths=16,32,64"]), tmp_path, QUIET).stages()]
    assert [i for i in ids if i.startswith("scale-")] == ["scale-d16-x1", "scale-d64-x1"]
    assert ids[-1] == "report"


def effect(value, se, threshold=0.0, direction=1, df=15):
    return {"value": value, "se": se, "df": df, "threshold": threshold, "direction": direction}


@pytest.mark.parametrize("small, large, trend", [
    (effect(0.05, 0.01), effect(-0.05, 0.01), "flips"),
    (effect(0.01, 0.005), effect(0.08, 0.01), "grows"),
    (effect(0.08, 0.01), effect(0.02, 0.01), "shrinks"),
    (effect(0.050, 0.0005), effect(0.051, 0.0005), "holds"),  # within the U-shape's sesoi (0.01)
    (effect(0.01, 0.02), effect(0.02, 0.02), "inconclusive"),
    # direction -1 (below the threshold is the claim): moving further below grows the effect
    (effect(0.45, 0.01, 0.5, -1), effect(0.2, 0.01, 0.5, -1), "grows"),
])
def test_the_scale_rule_on_synthetic_effects(small, large, trend):
    out = scale_trend(CRITERIA["oracle_u_shape"], small, large)
    assert out["trend"] == trend
    d = lambda e: e["direction"] * (e["value"] - e["threshold"])
    assert out["difference"]["value"] == pytest.approx(d(large) - d(small), abs=1e-5)


def test_an_untested_end_has_no_trend():
    assert scale_trend(CRITERIA["oracle_u_shape"], None, effect(0.1, 0.01))["trend"] is None


def test_the_scale_rule_is_frozen():
    """Changing the rule changes the fingerprint: bump SCALE_RULE_VERSION and say why in docs/LOG.md."""
    assert (SCALE_RULE_VERSION, scale_rule_fingerprint()) == (1, "9c26e0f03202fa26")  # version 1: issue 29, 2026-12-07


def test_a_study_over_two_widths_reports_each_size_on_the_same_tokens(tmp_path):
    out = tmp_path / "run"
    run_study("tiny", None, out, ["study.widths=32,64", "study.router_methods=budget", "study.router_targets=1/2"],
              log=QUIET)
    wide = out / "scale" / "d64-x1"
    m = load_run_config(wide).model
    assert (m.d_model, m.n_heads, m.d_ff_big, m.d_ff_small) == (64, 4, 128, 8)
    assert (wide / "report" / "results.json").is_file() and (wide / "null").is_dir()  # its own null control
    res = json.loads((out / "report" / "results.json").read_text())
    sec = res["scale"]
    assert [r["d_model"] for r in sec["sizes"]] == [32, 64] and sec["same_tokens"]
    assert sec["sizes"][0]["size"] == "d32-x1 (this run)" and sec["sizes"][1]["size"] == "d64-x1"
    assert sec["sizes"][0]["params"] < sec["sizes"][1]["params"]
    own = sec["sizes"][0]
    assert own["oracle_gain"]["lo"] <= own["oracle_gain"]["value"] <= own["oracle_gain"]["hi"]
    gap = {g["k"]: g for g in res["gap"]}
    assert own["count_null_share"] == {f"k{k}": gap[k]["count_null"]["recovered"] for k in (1, 3)}  # L = 4
    assert own["gap_nats"] == next(f for f in res["findings"] if f["id"] == "difficulty_not_raw_loss"
                                   and f["context"] == "shared")["numbers"]["mean_benefit_nats"]
    by_key = {(f["id"], f["context"]): f for f in res["findings"]}
    wide_res = json.loads((wide / "report" / "results.json").read_text())
    for t in sec["findings"]:
        assert t["trend"] in (*TRENDS, None)
        assert t["effects"][0] == by_key[(t["id"], t["context"])]["effect"]
        assert t["effects"][1] == next(f["effect"] for f in wide_res["findings"]
                                       if (f["id"], f["context"]) == (t["id"], t["context"]))
    assert "scale" in res["figures"] and (out / "report" / "figures" / "scale.png").is_file()
    md = (out / "report" / "report.md").read_text()
    assert "Scale: the study per model size" in md and "Scale: each finding's effect per size" in md
