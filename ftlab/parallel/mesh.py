"""The device mesh from ``config.mesh.shape``: named axes ``data``, ``fsdp``, ``tensor``.

Every mesh has all three axes (absent ones have size 1), always in that order, so the
sharding rules can name any of them and ``tensor`` (the most communication-heavy axis) is
the innermost, i.e. on the most tightly connected devices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AbstractMesh, Mesh

from ftlab.config import ConfigError

AXES = ("data", "fsdp", "tensor")
DEFAULT_SHAPE = {"data": -1}  # pure data parallelism over every device


def _describe(shape: Mapping[str, int]) -> str:
    return " x ".join(f"{axis}={size}" for axis, size in shape.items()) or "(empty)"


def resolve_shape(
    shape: Mapping[str, int] | None, num_devices: int, key: str = "config.mesh.shape"
) -> dict[str, int]:
    """Axis sizes for ``num_devices`` devices: ``-1`` (at most one axis) takes the rest.

    Raises ``ConfigError`` naming ``key`` and the numbers when the sizes cannot cover the
    devices exactly, before anything is compiled.
    """
    shape = dict(DEFAULT_SHAPE if not shape else shape)
    unknown = sorted(set(shape) - set(AXES))
    if unknown:
        raise ConfigError(
            f"{key}: unknown mesh axis {', '.join(map(repr, unknown))}; axes are {', '.join(AXES)}"
        )
    for axis, size in shape.items():
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ConfigError(f"{key}.{axis}: size must be a positive integer or -1, got {size!r}")
    rest = [axis for axis, size in shape.items() if size == -1]
    if len(rest) > 1:
        raise ConfigError(f"{key}: only one axis may be -1, got {_describe(shape)}")
    fixed = math.prod(size for size in shape.values() if size != -1)
    if rest:
        if num_devices % fixed:
            raise ConfigError(
                f"{key}: {_describe(shape)} does not divide the devices: the fixed axes need "
                f"a multiple of {fixed} devices, and there are {num_devices}"
            )
        shape[rest[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"{key}: {_describe(shape)} = {fixed} devices, but there are {num_devices}; "
            "make the product equal the device count, or set one axis to -1"
        )
    return {axis: shape.get(axis, 1) for axis in AXES}


def make_mesh(
    shape: Mapping[str, int] | None = None,
    devices: Sequence[jax.Device] | None = None,
    key: str = "config.mesh.shape",
) -> Mesh:
    """A mesh over ``devices`` (default ``jax.devices()``: every device of every host)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_shape(shape, len(devices), key)
    return jax.make_mesh(
        tuple(sizes.values()),
        AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
        devices=devices,
    )


def make_abstract_mesh(
    shape: Mapping[str, int] | None, num_devices: int, key: str = "config.mesh.shape"
) -> AbstractMesh:
    """A mesh of ``num_devices`` devices that need not exist: enough to derive shardings and
    per-device shapes (the memory planner for a machine you do not have), not to compile."""
    sizes = resolve_shape(shape, num_devices, key)
    return AbstractMesh(
        tuple(sizes.values()), AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES)
    )
