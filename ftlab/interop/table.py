"""One bidirectional name table per family: Hugging Face tensor name <-> ftlab parameter path.

Each ``Entry`` pairs an HF name template with one or more ftlab path templates and a
``Transform`` whose inverse undoes it, so import (``Table.to_ftlab``) and export
(``Table.to_hf``) are read off the same rows and cannot drift apart. Templates use ``{i}`` for a
number and ``{name:a|b}`` for one of a few words; both sides of an entry use the same
placeholders::

    Entry("h.{i}.{ln:ln_1|ln_2}.weight", "h_{i}/{ln}/scale")
    Entry("h.{i}.attn.c_attn.weight", ("h_{i}/attn/q_proj/kernel", ...), split(3))

HF names are written without the family's base-model prefix (``transformer.``, ``bert.``);
``head=True`` marks heads that HF saves outside it (``lm_head``, ``classifier``). ftlab paths
name leaves of the ``params`` collection (``h_0/ln_1/scale``); a leaf of another collection
starts with the collection's name (``batch_stats/stem_norm/mean``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

Arrays = list[np.ndarray]


@dataclasses.dataclass(frozen=True)
class Transform:
    """``to_ftlab(hf_array, n) -> n ftlab arrays`` and its inverse ``to_hf(ftlab arrays)``."""

    name: str
    to_ftlab: Callable[[np.ndarray, int], Arrays]
    to_hf: Callable[[Arrays], np.ndarray]


def elementwise(
    name: str, forward: Callable[[np.ndarray], np.ndarray], inverse: Callable
) -> Transform:
    """A one-to-one transform from a function and its inverse."""
    return Transform(name, lambda a, n: [forward(a)], lambda parts: inverse(parts[0]))


def _t(a: np.ndarray) -> np.ndarray:
    return a.T if a.ndim == 2 else a


AS_IS = elementwise("as is", lambda a: a, lambda a: a)
# PyTorch nn.Linear.weight (out, in) <-> Flax Dense.kernel (in, out); 1-D unchanged.
LINEAR = elementwise("transposed", _t, _t)
# PyTorch Conv2d.weight OIHW <-> Flax Conv.kernel HWIO.
CONV = elementwise(
    "OIHW -> HWIO", lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)
)


def split(axis: int = -1) -> Transform:
    """One fused HF tensor <-> equal ftlab parts side by side along ``axis`` (GPT-2's c_attn)."""

    def apart(a: np.ndarray, n: int) -> Arrays:
        if a.shape[axis] % n:
            raise ValueError(f"shape {a.shape} does not split into {n} equal parts")
        return list(np.split(a, n, axis=axis))

    return Transform(f"split in parts along axis {axis}", apart, lambda p: np.concatenate(p, axis))


_SLOT = re.compile(r"\{(\w+)(?::([^}]*))?\}")


def _slots(template: str) -> dict[str, str]:
    """Each placeholder's regex: ``{i}`` a number, ``{x:a|b}`` one of the words."""
    return {
        m.group(1): "|".join(re.escape(c) for c in m.group(2).split("|")) if m.group(2) else r"\d+"
        for m in _SLOT.finditer(template)
    }


def _regex(template: str, slots: Mapping[str, str] | None = None) -> re.Pattern:
    """``template`` as a regex; ``slots`` (the other side's) say what a bare ``{x}`` matches."""
    slots = {**_slots(template), **(slots or {})}
    out, pos, seen = [], 0, set()
    for m in _SLOT.finditer(template):
        out.append(re.escape(template[pos : m.start()]))
        name = m.group(1)
        if name in seen:
            out.append(f"(?P={name})")
        else:
            seen.add(name)
            out.append(f"(?P<{name}>{slots[name]})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out))


def _plain(template: str) -> str:
    return _SLOT.sub(lambda m: "{" + m.group(1) + "}", template)


@dataclasses.dataclass(frozen=True)
class Entry:
    """HF tensor ``hf`` <-> ftlab leaves ``ftlab`` (one path or several), by ``transform``."""

    hf: str
    ftlab: str | tuple[str, ...]
    transform: Transform = AS_IS
    head: bool = False  # saved outside the base-model prefix (lm_head, score, classifier)

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.ftlab,) if isinstance(self.ftlab, str) else tuple(self.ftlab)


class Table:
    """The rows of one family (for one configuration: a ResNet's depths are spelled out)."""

    def __init__(self, entries: Iterable[Entry]):
        self.entries = tuple(entries)
        self._hf = [(_regex(e.hf), e) for e in self.entries]
        self._ftlab = [(_regex(p, _slots(e.hf)), e) for e in self.entries for p in e.paths]

    def match_hf(self, name: str) -> tuple[Entry, dict[str, str]] | None:
        """The entry whose HF template matches ``name`` (prefix removed), and its slot values."""
        for regex, entry in self._hf:
            m = regex.fullmatch(name)
            if m:
                return entry, m.groupdict()
        return None

    def match_ftlab(self, path: str) -> tuple[Entry, dict[str, str]] | None:
        for regex, entry in self._ftlab:
            m = regex.fullmatch(path)
            if m:
                return entry, m.groupdict()
        return None

    def to_ftlab(self, name: str, array: np.ndarray) -> dict[str, np.ndarray] | None:
        """``{ftlab path: array}`` for one HF tensor (prefix removed); None when no row knows it.
        A transform that does not fit the array is a ``ValueError`` naming the tensor."""
        hit = self.match_hf(name)
        if hit is None:
            return None
        entry, slots = hit
        paths = [_plain(p).format(**slots) for p in entry.paths]
        try:
            parts = entry.transform.to_ftlab(np.asarray(array), len(paths))
        except ValueError as e:
            raise ValueError(f"tensor {name!r} ({entry.transform.name}): {e}") from None
        return dict(zip(paths, parts))

    def to_hf(self, flat: Mapping[str, np.ndarray], *, prefix: str = "") -> dict[str, np.ndarray]:
        """``{HF name: array}`` for ftlab leaves ``flat``; ``prefix`` goes before non-head names.
        A leaf no row names, or a row whose other leaves are missing, is a ``KeyError`` naming
        the leaf."""
        out: dict[str, np.ndarray] = {}
        done: set[str] = set()
        for path in sorted(flat):
            if path in done:
                continue
            hit = self.match_ftlab(path)
            if hit is None:
                raise KeyError(path)
            entry, slots = hit
            paths = [_plain(p).format(**slots) for p in entry.paths]
            missing = [p for p in paths if p not in flat]
            if missing:
                raise KeyError(f"{path} (needs {', '.join(missing)} beside it)")
            name = ("" if entry.head else prefix) + _plain(entry.hf).format(**slots)
            if name in out:
                raise KeyError(f"{path} (HF tensor {name!r} written twice)")
            out[name] = entry.transform.to_hf([np.asarray(flat[p]) for p in paths])
            done.update(paths)
        return out


def linear(hf_module: str, ftlab_module: str, *, bias: bool = True, head: bool = False):
    """The rows of an ``nn.Linear``: ``M.weight`` <-> ``m/kernel`` transposed, ``M.bias``."""
    rows = [Entry(f"{hf_module}.weight", f"{ftlab_module}/kernel", LINEAR, head)]
    if bias:
        rows.append(Entry(f"{hf_module}.bias", f"{ftlab_module}/bias", AS_IS, head))
    return rows


def layer_norm(hf_module: str, ftlab_module: str, *, bias: bool = True, head: bool = False):
    """The rows of a LayerNorm: ``M.weight`` <-> ``m/scale``, ``M.bias`` <-> ``m/bias``."""
    rows = [Entry(f"{hf_module}.weight", f"{ftlab_module}/scale", AS_IS, head)]
    if bias:
        rows.append(Entry(f"{hf_module}.bias", f"{ftlab_module}/bias", AS_IS, head))
    return rows


def batch_norm(hf_module: str, ftlab_module: str) -> list[Entry]:
    """A BatchNorm: affine parameters in ``params``, running statistics in ``batch_stats``."""
    return [
        *layer_norm(hf_module, ftlab_module),
        Entry(f"{hf_module}.running_mean", f"batch_stats/{ftlab_module}/mean"),
        Entry(f"{hf_module}.running_var", f"batch_stats/{ftlab_module}/var"),
    ]


def rows(*groups: Entry | Sequence[Entry]) -> list[Entry]:
    """Flatten entries and lists of entries into one list of rows."""
    out: list[Entry] = []
    for g in groups:
        out.extend([g] if isinstance(g, Entry) else g)
    return out


class Renames:
    """Module names that differ between a checkpoint and the model in memory, both ways.

    transformers 5 renames some modules when it loads a checkpoint (ViT's
    ``encoder.layer.0.attention.attention.query`` is ``layers.0.attention.q_proj`` in
    memory), and PEFT names adapters by the in-memory modules. Pairs are (checkpoint
    template, in-memory template) in the ``Entry`` template syntax; a name no pair matches
    is the same in both.
    """

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()):
        self.pairs = tuple(pairs)
        self._out = [(_regex(a), _plain(b)) for a, b in self.pairs]
        self._in = [(_regex(b, _slots(a)), _plain(a)) for a, b in self.pairs]

    @staticmethod
    def _apply(rules, name: str) -> str:
        for regex, template in rules:
            m = regex.fullmatch(name)
            if m:
                return template.format(**m.groupdict())
        return name

    def to_memory(self, module: str) -> str:
        return self._apply(self._out, module)

    def to_checkpoint(self, module: str) -> str:
        return self._apply(self._in, module)
