from pathlib import Path

import pytest
import yaml

from duollm.config import PRESETS, load_config, load_run_config, save_config, to_dict


def test_presets_load_and_cpu_is_twelve_layers():
    for name in PRESETS:
        cfg = load_config(name)
        assert cfg.preset == name
    cpu = load_config("cpu").model
    assert cpu.n_layers == 12 and cpu.d_ff_big == 16 * cpu.d_ff_small  # like the paper


def test_precedence_defaults_yaml_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"preset": "tiny", "train": {"steps": 7, "lr": 0.01}}))
    cfg = load_config(str(f), ["train.lr=0.02", "routing.per=sequence"])
    assert cfg.model.d_model == PRESETS["tiny"]["model"]["d_model"]  # preset
    assert cfg.train.steps == 7  # YAML over preset
    assert cfg.train.lr == 0.02  # override over YAML
    assert cfg.routing.per == "sequence"


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("tiny", ["train.steps=3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert to_dict(load_run_config(tmp_path)) == to_dict(cfg)


@pytest.mark.parametrize("overrides,message", [
    (["train.stpes=3"], "unknown config key train.stpes"),
    (["nope=1"], "unknown config key nope"),
    (["train.steps=three"], "train.steps expects an integer"),
    (["train.compile=maybe"], "train.compile expects true/false"),
    (["routing.p_big=0.7"], "sum to 1"),
    (["routing.p_big=-0.5", "routing.p_small=1.5"], ">= 0"),
    (["train.steps"], "key=value"),
    (["model.d_model=31"], "not divisible"),
    (["model.d_model=30"], "must be even for RoPE"),
])
def test_strict_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config("tiny", overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        load_config("huge")


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")))
def test_every_shipped_config_loads_and_trains_a_step_from_anywhere(name, tmp_path, monkeypatch):
    """Issue 28, item 9: configs/cpu-shakespeare.yaml pointed at a corpus outside the clone, relative to the
    working directory. Every shipped config now trains a step, run from an unrelated folder."""
    from conftest import cli

    config = Path(__file__).resolve().parents[1] / "configs" / name
    monkeypatch.chdir(tmp_path)
    cli("train", "--config", config, "--out", tmp_path / "run", "--set", "train.steps=1", "train.batch_size=2",
        "train.compile=false", "train.eval_every=100", "train.eval_tokens=256", "data.max_chars=300000",
        "eval.max_tokens=256")
    assert (tmp_path / "run" / "latest").resolve().name == "step-0000001"
    saved = load_config(str(tmp_path / "run" / "config.yaml"), saved=True)
    if saved.data.spec.startswith("file:"):
        path = Path(saved.data.spec[5:])  # resolved against the config's folder: absolute, and there (or a glob that is)
        assert path.is_absolute() and (path.exists() or any(path.parent.glob(path.name)))
