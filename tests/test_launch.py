"""Every `ftlab train|plan` command the README and the Colab notebook show is a valid command:
its config loads, its overrides name real keys with valid values (run as far as this
machine allows: the TPU and multi-GPU launches themselves cannot run here)."""

import json
import re
import shlex
from pathlib import Path

import pytest

from ftlab.cli import _parser
from ftlab.config import apply_overrides, load_config, split_config_args
from ftlab.parallel import runtime
from ftlab.schema import validate

ROOT = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"ftlab (?:train|plan) [^\"\n`#]*")


def _commands() -> list[str]:
    readme = (ROOT / "README.md").read_text().replace("\\\n", " ")
    notebook = json.loads((ROOT / "experiments" / "colab_tpu.ipynb").read_text())
    cells = "\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
    found = COMMAND.findall(readme) + COMMAND.findall(cells)
    return sorted(
        {c.strip().rstrip("`").strip() for c in found if "..." not in c and "CONFIG" not in c}
    )


def test_the_docs_show_every_launch_path():
    text = " ".join(_commands())
    for platform in ("cpu", "gpu", "tpu"):
        assert f"--config.platform={platform}" in text
    assert "ftlab plan" in text


@pytest.mark.parametrize("command", _commands())
def test_documented_command_is_valid(command):
    argv = shlex.split(command)[1:]
    spec, overrides, rest = split_config_args(argv)
    args = _parser().parse_args(rest)
    spec = spec or args.config_file
    assert (ROOT / spec.split(":")[0]).exists(), spec
    cfg = apply_overrides(load_config(str(ROOT / spec)), overrides)
    validate(cfg)
    assert cfg.platform in runtime.PLATFORMS and cfg.distributed in runtime.DISTRIBUTED
