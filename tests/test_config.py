from pathlib import Path

import pytest

from lc_jax.config import ConfigError, load, parse_arg, validate


def _problems(config, **kw):
    with pytest.raises(ConfigError) as e:
        validate(config, **kw)
    return "\n".join(e.value.problems)


def test_base_and_quickstart_configs_are_valid():
    validate(load("configs/base.py"), num_devices=1)
    validate(load("configs/quickstart.py"), num_devices=1)
    validate(load("configs/base.py", "position=alibi,attention=sliding"), num_devices=1)


def test_unknown_scheme_names_allowed_values(tiny_config):
    msg = _problems(tiny_config(**{"model.position.name": "rotary"}))
    assert "model.position.name='rotary'" in msg and "'rope'" in msg and "'alibi'" in msg


def test_unknown_variant(tiny_config):
    msg = _problems(tiny_config(**{"model.attention.name": "linear"}))
    assert "model.attention.name='linear'" in msg and "'sliding'" in msg


@pytest.mark.parametrize("window", [0, -3])
def test_window_must_be_positive(tiny_config, window):
    msg = _problems(tiny_config("attention=sliding", **{"model.attention.window": window}))
    assert "model.attention.window" in msg and "positive" in msg


def test_heads_divisible_by_kv_heads(tiny_config):
    msg = _problems(tiny_config(**{"model.num_kv_heads": 3}))
    assert "model.num_kv_heads=3" in msg and "[1, 2, 4]" in msg


def test_seq_len_must_fit_max_len(tiny_config):
    msg = _problems(tiny_config(**{"data.seq_len": 128}))
    assert "data.seq_len=128" in msg and "model.max_seq_len=64" in msg


def test_every_problem_reported_at_once(tiny_config):
    c = tiny_config(**{"model.dtype": "fp8", "model.remat": "some", "data.packing": "greedy",
                       "model.attention.impl": "magic", "train.lr": -1.0, "data.source": "web"})
    msg = _problems(c)
    for field in ("model.dtype", "model.remat", "data.packing", "model.attention.impl", "train.lr", "data.source"):
        assert field in msg


def test_rope_fields(tiny_config):
    msg = _problems(tiny_config(**{"model.position.layout": "zigzag", "model.position.fraction": 1.5}))
    assert "model.position.layout='zigzag'" in msg and "'interleaved'" in msg
    assert "model.position.fraction=1.5" in msg


def test_mesh_must_match_devices(tiny_config):
    c = tiny_config(**{"mesh.data": 3})
    assert "mesh" in _problems(c, num_devices=8)
    c = tiny_config(**{"mesh.data": -1, "mesh.fsdp": -1})
    assert "at most one axis" in _problems(c, num_devices=8)
    validate(tiny_config(**{"mesh.data": -1}), num_devices=2)


def test_parse_arg_rejects_unknown_keys():
    assert parse_arg("position=alibi", position="rope", attention="full").position == "alibi"
    with pytest.raises(ConfigError, match="'positon' is not one of"):
        parse_arg("positon=alibi", position="rope", attention="full")


def test_config_paths_resolve_from_any_working_directory(tmp_path, monkeypatch):
    from lc_jax import cli
    from lc_jax.config import ROOT, find

    monkeypatch.chdir(tmp_path)  # a notebook starts in notebooks/, a script anywhere
    assert find("configs/quickstart.py") == ROOT / "configs" / "quickstart.py"
    assert cli.load("configs/quickstart.py:position=alibi").model.position.name == "alibi"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "quickstart.py").write_text("")
    assert find("configs/quickstart.py") == Path("configs/quickstart.py")  # the working directory's own wins
    assert find("configs/nope.py") == Path("configs/nope.py")  # and a missing file keeps its name for the error


@pytest.mark.parametrize("path", ["configs/ablations/positions.py", "configs/ablations/attention.py",
                                  "configs/passkey.py", "configs/ablations/layer_patterns.py"])
def test_every_sweep_member_is_valid(path):
    from lc_jax.config import load_module

    module = load_module(path)
    names = [name for name, _ in module.get_sweep()]
    assert len(names) == len(set(names)) >= 2
    if path.endswith("positions.py"):
        assert {"nope", "learned", "sinusoidal", "rope", "alibi"} <= set(names)
    for _, arg in module.get_sweep():
        validate(module.get_config(arg), num_devices=1)
