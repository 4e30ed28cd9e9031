"""What the decoder families (GPT-2, LLaMA) share: building from config.json, their heads, and
the tied-embedding check on export."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ftlab.interop.errors import HFExportError

HEADS = {"lm": "lm_head/", "classifier": "score/"}
PEFT_TASK = {"lm": "CAUSAL_LM", "classifier": "SEQ_CLS", "none": "FEATURE_EXTRACTION"}


def builder(config_from_hf: Callable[..., Any], module: type[nn.Module]) -> Callable:
    """``Family.build`` for a decoder: the family's config dataclass, then the module."""

    def build(hf: dict, head: str, options: dict, overrides: dict) -> nn.Module:
        return module(config_from_hf(hf, **overrides), head=head, **options)

    return build


def example_inputs(model: nn.Module) -> Any:
    return jnp.zeros((1, 1), jnp.int32)


def tied_check(tie_default: bool) -> Callable[[Mapping[str, Any], Mapping[str, Any], str], None]:
    """``Family.check_export``: an own ``lm_head`` exactly when the config unties it."""

    def check(config: Mapping[str, Any], flat: Mapping[str, Any], head: str) -> None:
        tied = bool(config.get("tie_word_embeddings", tie_default))
        if tied and "lm_head/kernel" in flat:
            raise HFExportError(
                "params have an untied lm_head/kernel but hf_config says tie_word_embeddings=true"
            )
        if not tied and head == "lm" and "lm_head/kernel" not in flat:
            raise HFExportError(
                "hf_config says tie_word_embeddings=false (an own lm_head) but params have no "
                "lm_head/kernel"
            )

    return check
