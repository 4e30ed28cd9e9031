"""The layering of ftlab's packages (../shared/DESIGN.md, "Layout and layering"), held by an AST
check over ftlab/**.py: every ``import`` and ``from ... import``, module-level or inside a
function (lazy), must keep to ``RULES``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ftlab"

# (who, must not import, except, why). ``who`` and the imported names match a module or
# anything under it ("ftlab.models" covers ftlab.models.gpt2).
RULES: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("ftlab.models", "ftlab.methods", (), "models know nothing of methods"),
    ("ftlab.models", "ftlab.train", (), "models know nothing of training"),
    ("ftlab.models", "ftlab.data", (), "models know nothing of data"),
    ("ftlab.models", "ftlab.interop", (), "models know nothing of Hugging Face files"),
    ("ftlab.methods", "ftlab.models", (), "methods know parameter paths, not model classes"),
    ("ftlab.methods", "ftlab.interop", (), "methods know parameter paths, not checkpoints"),
    ("ftlab.data", "ftlab.models", (), "data imports no model code"),
    (
        "ftlab.data",
        "ftlab.interop",
        ("ftlab.interop.hub", "ftlab.interop.errors"),
        "data reaches the hub only through interop.hub, which imports no model code",
    ),
    ("ftlab.interop.hub", "ftlab", ("ftlab.interop.errors",), "hub stands alone (data uses it)"),
    ("ftlab.interop.errors", "ftlab", (), "errors stand alone"),
    ("ftlab.interop.files", "ftlab", ("ftlab.interop.errors",), "files stand alone"),
    ("ftlab.interop.table", "ftlab", (), "the table machinery stands alone"),
    ("ftlab.interop", "ftlab.train", (), "interop sits below training"),
    ("ftlab.interop", "ftlab.data", (), "interop knows no data pipeline"),
    ("ftlab.interop", "ftlab.cli", (), "nothing imports the CLI"),
    ("ftlab", "ftlab.cli", ("ftlab.__main__",), "nothing imports the CLI"),
    (
        "ftlab.parallel",
        "ftlab.train",
        # TrainState is a plain pytree that shard.py builds; moving it below parallel/ is its
        # owners' change (reported in issue 11's hand-over). The loop, steps, optim: never.
        ("ftlab.train.state",),
        "parallel knows no training loop",
    ),
)
# The interop package's __init__ runs whenever data imports ftlab.interop.hub: it stays empty.
EMPTY_PACKAGES = ("ftlab.interop",)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, imported name) for every import in ``source``, lazy ones included; ``from a
    import b`` gives ``a.b`` (a submodule or a name in ``a``)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")
                package = package if is_package else package[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return out


def violations(module: str, found: list[tuple[int, str]]) -> list[str]:
    bad = []
    for line, name in found:
        for who, banned, allowed, why in RULES:
            if not _under(module, who) or not _under(name, banned):
                continue
            if any(_under(name, a) or _under(module, a) for a in allowed):
                continue
            if _under(name, module):  # a package importing its own modules
                continue
            bad.append(f"{module}:{line} imports {name} ({why})")
    if module in EMPTY_PACKAGES:
        bad += [f"{module}:{line} imports {name} (keep it empty)" for line, name in found]
    return bad


def test_no_module_imports_against_the_layering():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        module = module_name(path)
        found = imports(path.read_text(), module, path.name == "__init__.py")
        bad += violations(module, found)
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "module,source,hit",
    [
        ("ftlab.models.x", "def f():\n    from ftlab.methods import lora\n", "methods"),
        ("ftlab.data.x", "import ftlab.models.gpt2\n", "no model code"),
        ("ftlab.data.x", "from ftlab.interop import bert\n", "interop.hub"),
        ("ftlab.methods.x", "from ..models import gpt2\n", "not model classes"),
        ("ftlab.train.x", "from ftlab import cli\n", "CLI"),
        ("ftlab.interop", "from ftlab.interop import hub\n", "keep it empty"),
    ],
)
def test_the_check_finds_lazy_relative_and_plain_imports(module, source, hit):
    found = imports(source, module)
    assert any(hit in v for v in violations(module, found))


def test_allowed_imports_pass():
    for module, source in [
        ("ftlab.data.text", "from ftlab.interop.hub import hub_offline\n"),
        ("ftlab.interop.peft", "from ftlab.methods.lora import LoraSpec\n"),
        ("ftlab.train.loop", "from ftlab.interop.build import build_model\n"),
    ]:
        assert violations(module, imports(source, module)) == []
