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
