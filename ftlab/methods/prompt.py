"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning"): a learned soft prompt of ``v`` virtual-token embeddings prepended to the input
embeddings of a decoder LM or of T5's encoder, everything in the base model frozen.

Trainable leaf: ``{"prompt": {"embeddings": (v, embed)}}`` beside ``"params"`` / ``"lora"``.
``Method.apply`` passes it to the model as ``prompt_embeds``; the decoders
(``ftlab.models.layers.Decoder``: GPT-2, LLaMA) prepend it to the token embeddings exactly as
PEFT's ``PeftModelForCausalLM.forward`` does (v leading ones in the attention mask, positions
``0..v-1`` for the prompt and ``v + position`` for the tokens) and slice the v prompt positions
off the logits, so labels, losses and metrics are those of the plain model. T5
(``ftlab.models.t5.T5``, the paper's model) prepends it to the encoder's input embeddings, as
PEFT's ``PeftModelForSeq2SeqLM.forward`` (PROMPT_TUNING) does: v leading ones in the source mask,
the decoder and its logits unchanged. Nothing merges into the base weights:
``Method.merged_params`` (the exported plain model) is the base model.

Initialisation (``method.prompt.init``), PEFT's ``PromptTuningInit``:

- ``random``: N(0, 1), as ``torch.nn.Embedding``'s default (PEFT's ``RANDOM``);
- ``vocab``: the embeddings of ``v`` token ids drawn uniformly from the vocabulary
  (``SAMPLE_VOCAB``);
- ``text``: the embeddings of ``method.prompt.init_text`` tokenised by the run's tokenizer,
  repeated or cut to ``v`` tokens (``TEXT``).

Supported models: causal LMs with a decoder token embedding at ``wte/embedding`` (GPT-2) or
``embed_tokens/embedding`` (LLaMA) and no classification head (``train.loss`` ``causal_lm``),
and T5, whose token embedding is ``shared/embedding`` (``train.loss`` ``seq2seq``); errors name
the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

INITS = ("random", "vocab", "text")
PEFT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}
# decoder token embeddings (GPT-2, LLaMA): the prompt has their width; "vocab" / "text" copy rows
DECODER_EMBEDDINGS = ("wte/embedding", "embed_tokens/embedding")
# T5's shared token embedding: the prompt goes before the encoder's input embeddings
ENCODER_DECODER_EMBEDDINGS = ("shared/embedding",)
EMBEDDINGS = DECODER_EMBEDDINGS + ENCODER_DECODER_EMBEDDINGS
HEADS = ("score/kernel",)  # a sequence-classification head: not supported
LOSSES = ("causal_lm", "seq2seq")  # the train.loss values prompt tuning runs with
SUPPORTED = (
    "causal language models (train.loss 'causal_lm') on GPT-2 and LLaMA and T5 "
    "encoder-decoders (train.loss 'seq2seq')"
)


def embedding_path(paths: Sequence[str]) -> str:
    """The token embedding the soft prompt extends, of a model with these parameter paths
    (ConfigError if the model is not a causal LM or T5 that ftlab can prompt-tune)."""
    from ftlab.config import ConfigError

    found = [p for p in EMBEDDINGS if p in paths]
    if not found or any(h in paths for h in HEADS):
        what = "a sequence-classification head (score)" if found else "no such token embedding"
        raise ConfigError(
            f"config.method.name: 'prompt' (prompt tuning) supports {SUPPORTED}, whose token "
            f"embedding is {' or '.join(EMBEDDINGS)}; this model has {what}"
        )
    return found[0]


def is_encoder_decoder(source: str) -> bool:
    """Whether the prompt's token embedding (``embedding_path``) is an encoder-decoder's (T5):
    the prompt goes to the encoder and the PEFT task type is ``SEQ_2_SEQ_LM``."""
    return source in ENCODER_DECODER_EMBEDDINGS


def init_ids(text_ids: Sequence[int], num_tokens: int) -> tuple[int, ...]:
    """PEFT's ``TEXT`` init: the text's token ids repeated, then cut, to ``num_tokens``."""
    ids = list(text_ids)
    if not ids:
        from ftlab.config import ConfigError

        raise ConfigError("config.method.prompt.init_text: tokenises to no token")
    ids = ids * math.ceil(num_tokens / len(ids))
    return tuple(int(i) for i in ids[:num_tokens])


def tokenize_init_text(text: str, tokenizer: Any, num_tokens: int) -> tuple[int, ...]:
    """``init_text`` through ``tokenizer`` (as ``tokenizer(text)["input_ids"]``, special tokens
    included, as PEFT does), fitted to ``num_tokens``."""
    from ftlab.config import ConfigError

    if not text:
        raise ConfigError("config.method.prompt.init_text: 'text' init needs a text")
    if tokenizer is None:
        raise ConfigError(
            "config.method.prompt.init: 'text' needs the run's tokenizer (a text dataset)"
        )
    return init_ids(tokenizer(text)["input_ids"], num_tokens)


def init_embeddings(
    embedding: jax.Array, num_tokens: int, init: str, rng: jax.Array, ids: Sequence[int] = ()
) -> jax.Array:
    """The initial soft prompt (num_tokens, embed), float32, from the token ``embedding``
    (vocab, embed) (dtype and values as stored; float32 here)."""
    vocab, dim = embedding.shape
    if init == "random":
        return jax.random.normal(rng, (num_tokens, dim), jnp.float32)
    if init == "vocab":
        ids = jax.random.randint(rng, (num_tokens,), 0, vocab)
    else:
        ids = jnp.asarray(ids, jnp.int32)
    return jnp.take(jnp.asarray(embedding).astype(jnp.float32), ids, axis=0)


def embeddings(trainable: Mapping) -> jax.Array:
    """The soft prompt (v, embed) of a trainable tree."""
    return trainable["prompt"]["embeddings"]
