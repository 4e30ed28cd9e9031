"""Tests for ftlab.config: loading config files and applying CLI overrides."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import ml_collections
import pytest

from ftlab.config import (
    ConfigError,
    apply_overrides,
    flat_keys,
    load_config,
    override_copy,
    split_config_args,
    to_dict,
)

CONFIG_SRC = textwrap.dedent(
    """
    import ml_collections

    import ftlab  # config files may import the package


    def get_config(arg=None):
        cfg = ml_collections.ConfigDict()
        cfg.name = "base" if arg is None else arg
        cfg.seed = 0
        cfg.use_ema = False
        cfg.init_from = None
        cfg.tags = ("a", "b")
        cfg.optim = ml_collections.ConfigDict()
        cfg.optim.lr = 1e-3
        cfg.optim.steps = 100
        cfg.optim.betas = (0.9, 0.999)
        cfg.model = dict(dropout=0.1, hidden=128, lora=dict(rank=8, alpha=16.0))
        return cfg
    """
)


def _write(tmp_path: Path, src: str, name: str = "exp.py") -> Path:
    path = tmp_path / name
    path.write_text(src)
    return path


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    return _write(tmp_path, CONFIG_SRC)


@pytest.fixture
def cfg(cfg_path: Path) -> ml_collections.ConfigDict:
    return load_config(str(cfg_path))


# ----------------------------------------------------------------------- loading


def test_load_without_arg_calls_get_config_with_none(
    cfg: ml_collections.ConfigDict,
) -> None:
    assert isinstance(cfg, ml_collections.ConfigDict)
    assert cfg.name == "base"
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.is_locked


def test_load_with_arg(cfg_path: Path) -> None:
    cfg = load_config(f"{cfg_path}:vit:b16")  # arg may contain colons
    assert cfg.name == "vit:b16"


def test_load_no_arg_signature_and_required_arg(tmp_path: Path) -> None:
    no_arg = _write(
        tmp_path,
        "import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict({'x': 1})\n",
        "noarg.py",
    )
    assert load_config(str(no_arg)).x == 1
    with pytest.raises(ConfigError, match="takes no argument"):
        load_config(f"{no_arg}:foo")

    required = _write(
        tmp_path,
        "import ml_collections\n"
        "def get_config(arg):\n"
        "    return ml_collections.ConfigDict({'arg': arg})\n",
        "required.py",
    )
    assert load_config(str(required)).arg is None


def test_loaded_config_is_locked_against_new_keys(
    cfg: ml_collections.ConfigDict,
) -> None:
    with pytest.raises(AttributeError):
        cfg.optim.lrr = 1.0
    assert "lrr" not in cfg.optim


def test_load_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.py"
    with pytest.raises(ConfigError, match="not found") as exc:
        load_config(f"{missing}:arg")
    assert str(missing) in str(exc.value)


def test_load_without_get_config(tmp_path: Path) -> None:
    path = _write(tmp_path, "X = 1\n", "empty.py")
    with pytest.raises(ConfigError, match="get_config") as exc:
        load_config(str(path))
    assert str(path) in str(exc.value)


def test_load_rejects_non_configdict(tmp_path: Path) -> None:
    path = _write(tmp_path, "def get_config():\n    return {'a': 1}\n", "plain.py")
    with pytest.raises(ConfigError, match="expected ml_collections.ConfigDict"):
        load_config(str(path))


def test_two_files_with_same_name_do_not_clash(tmp_path: Path) -> None:
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    src = "import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict({{'v': {}}})\n"
    pa = _write(a, src.format(1), "same.py")
    pb = _write(b, src.format(2), "same.py")
    assert load_config(str(pa)).v == 1
    assert load_config(str(pb)).v == 2


# --------------------------------------------------------------------- flat_keys


def test_flat_keys_recurses_sections_and_plain_dicts(
    cfg: ml_collections.ConfigDict,
) -> None:
    keys = flat_keys(cfg)
    assert "optim.lr" in keys
    assert "model.lora.rank" in keys  # plain dict inside a ConfigDict
    assert "tags" in keys and "optim.betas" in keys  # tuples are leaves
    assert "optim" not in keys and "model.lora" not in keys


# --------------------------------------------------------------------- overrides


def test_typed_overrides_from_strings(cfg: ml_collections.ConfigDict) -> None:
    out = apply_overrides(
        cfg,
        [
            ("use_ema", "Yes"),
            ("seed", "42"),
            ("optim.lr", "3"),
            ("name", "42"),
            ("optim.betas", "(0.8, 0.99)"),
            ("tags", "x,y,z"),
            ("init_from", "[1, 2]"),
            ("model.lora.rank", "16"),
        ],
    )
    assert out is cfg
    assert cfg.use_ema is True
    assert cfg.seed == 42 and type(cfg.seed) is int
    assert cfg.optim.lr == 3.0 and type(cfg.optim.lr) is float
    assert cfg.name == "42"
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.tags == ("x", "y", "z")
    assert cfg.init_from == [1, 2]
    assert cfg.model.lora.rank == 16


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("true", True), ("FALSE", False), ("1", True), ("0", False), ("no", False)],
)
def test_bool_spellings(cfg: ml_collections.ConfigDict, raw: str, expected: bool) -> None:
    cfg.use_ema = not expected
    apply_overrides(cfg, [("use_ema", raw)])
    assert cfg.use_ema is expected


def test_bad_bool_names_key(cfg: ml_collections.ConfigDict) -> None:
    with pytest.raises(ConfigError, match="'use_ema'.*bool"):
        apply_overrides(cfg, [("use_ema", "maybe")])


def test_none_field_falls_back_to_raw_string(cfg: ml_collections.ConfigDict) -> None:
    apply_overrides(cfg, [("init_from", "/ckpt/run-1")])
    assert cfg.init_from == "/ckpt/run-1"


def test_int_field_rejects_float_string(cfg: ml_collections.ConfigDict) -> None:
    with pytest.raises(ConfigError, match="'optim.steps'.*int.*'1e-3'"):
        apply_overrides(cfg, [("optim.steps", "1e-3")])
    assert cfg.optim.steps == 100


def test_dict_overrides_set_non_strings_as_is(cfg: ml_collections.ConfigDict) -> None:
    apply_overrides(cfg, {"optim.lr": 5e-4, "optim.steps": "7", "model": {"hidden": 64}})
    assert cfg.optim.lr == 5e-4
    assert cfg.optim.steps == 7
    assert cfg.model.hidden == 64


def test_wrong_type_value_names_key_type_and_value(
    cfg: ml_collections.ConfigDict,
) -> None:
    with pytest.raises(ConfigError) as exc:
        apply_overrides(cfg, {"optim.steps": "many"})
    msg = str(exc.value)
    assert "'optim.steps'" in msg and "int" in msg and "'many'" in msg

    # Non-string value rejected by ml_collections' own type check.
    with pytest.raises(ConfigError) as exc:
        apply_overrides(cfg, {"seed": [1, 2]})
    msg = str(exc.value)
    assert "'seed'" in msg and "int" in msg and "[1, 2]" in msg

    with pytest.raises(ConfigError, match="'seed'.*int.*True"):
        apply_overrides(cfg, {"seed": True})
    assert cfg.seed == 0


def test_unknown_key_suggests_nearest(cfg: ml_collections.ConfigDict) -> None:
    with pytest.raises(ConfigError) as exc:
        apply_overrides(cfg, [("optim.lrr", "0.1")])
    assert str(exc.value) == "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"

    with pytest.raises(ConfigError) as exc:
        apply_overrides(cfg, {"model.dropuot": 0.2})
    assert str(exc.value) == "unknown config key 'model.dropuot'; did you mean 'model.dropout'?"


def test_unknown_key_suggests_by_last_component(cfg: ml_collections.ConfigDict) -> None:
    with pytest.raises(ConfigError, match="did you mean 'model.lora.rank'"):
        apply_overrides(cfg, [("rank", "4")])


def test_unknown_key_without_close_match_lists_section(
    cfg: ml_collections.ConfigDict,
) -> None:
    with pytest.raises(ConfigError) as exc:
        apply_overrides(cfg, [("optim.zzzzzzzz", "1")])
    msg = str(exc.value)
    assert msg.startswith("unknown config key 'optim.zzzzzzzz'")
    assert "under 'optim'" in msg and "optim.lr" in msg and "optim.steps" in msg
    assert "did you mean" not in msg


def test_section_cannot_be_set_to_scalar(cfg: ml_collections.ConfigDict) -> None:
    with pytest.raises(ConfigError, match="'optim' is a section"):
        apply_overrides(cfg, [("optim", "3")])
    with pytest.raises(ConfigError, match="'model.lora' is a section"):
        apply_overrides(cfg, {"model.lora": 3})
    assert cfg.optim.lr == pytest.approx(1e-3)


# ---------------------------------------------------------------------- CLI args


def test_split_config_args_mixed_argv() -> None:
    argv = [
        "train",
        "--config",
        "configs/exp.py:vit",
        "--config.optim.lr=0.1",
        "--workdir=/tmp/w",
        "--config.seed",
        "3",
        "-v",
        "--config.tags=a,b",
        "--",
        "--config.seed=9",
    ]
    spec, overrides, rest = split_config_args(argv)
    assert spec == "configs/exp.py:vit"
    assert overrides == [("optim.lr", "0.1"), ("seed", "3"), ("tags", "a,b")]
    assert rest == ["train", "--workdir=/tmp/w", "-v", "--", "--config.seed=9"]


def test_split_config_args_equals_form_and_no_config() -> None:
    assert split_config_args(["--config=c.py"]) == ("c.py", [], [])
    assert split_config_args(["--configs=x", "a"]) == (None, [], ["--configs=x", "a"])


def test_split_config_args_missing_value() -> None:
    with pytest.raises(ConfigError, match="--config.seed"):
        split_config_args(["--config.seed"])
    with pytest.raises(ConfigError, match="--config"):
        split_config_args(["--config", "--other"])


def test_cli_round_trip(cfg_path: Path) -> None:
    spec, overrides, _ = split_config_args([f"--config={cfg_path}:small", "--config.seed", "5"])
    assert spec is not None
    cfg = apply_overrides(load_config(spec), overrides)
    assert (cfg.name, cfg.seed) == ("small", 5)


# ------------------------------------------------------------------ dict / copies


def test_to_dict_json_round_trip(cfg: ml_collections.ConfigDict) -> None:
    d = to_dict(cfg)
    assert type(d) is dict and type(d["model"]["lora"]) is dict
    assert d["tags"] == ["a", "b"] and d["optim"]["betas"] == [0.9, 0.999]
    assert json.loads(json.dumps(d)) == d
    assert d["init_from"] is None and d["optim"]["steps"] == 100


def test_override_copy_leaves_original_unchanged(
    cfg: ml_collections.ConfigDict,
) -> None:
    variant = override_copy(cfg, {"optim.lr": "0.5", "model.lora.rank": 4})
    assert variant.optim.lr == 0.5 and variant.model.lora.rank == 4
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.model.lora.rank == 8
    assert variant.is_locked
    assert variant.model.lora is not cfg.model.lora


def test_override_copy_bad_key_does_not_touch_original(
    cfg: ml_collections.ConfigDict,
) -> None:
    before = to_dict(cfg)
    with pytest.raises(ConfigError):
        override_copy(cfg, {"seed": 1, "optim.lrr": 0.1})
    assert to_dict(cfg) == before
