"""The tokenizer a model loads with: ``TokenizerWrapper`` (mlx-lm's name)
gives the native tokenizer the Hugging Face/mlx-lm methods generation needs.
A leaf: both a local model (``utils``) and a cluster (``cluster``) make one."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np

from mlx_dist import _core


class TokenizerWrapper:
    """The tokenizer, with the Hugging Face/mlx-lm methods generation needs."""

    def __init__(self, core: _core.Tokenizer):
        self._core = core

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._core.encode(text, add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._core.decode(_token_list(ids), skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **kwargs,
    ):
        """Renders the chat template; returns token ids unless ``tokenize=False``
        (as Hugging Face tokenizers do)."""
        text = self._core.apply_chat_template(
            json.dumps(messages),
            add_generation_prompt,
            json.dumps(tools) if tools is not None else None,
            json.dumps(kwargs) if kwargs else None,
        )
        if not tokenize:
            return text
        return self._core.encode(text, False)

    @property
    def eos_token_ids(self) -> list[int]:
        return self._core.eos_token_ids

    @property
    def eos_token_id(self) -> int | None:
        ids = self._core.eos_token_ids
        return ids[0] if ids else None

    @property
    def bos_token(self) -> str | None:
        return self._core.bos_token

    @property
    def eos_token(self) -> str | None:
        return self._core.eos_token

    @property
    def chat_template(self) -> str | None:
        return self._core.chat_template

    @property
    def has_chat_template(self) -> bool:
        return self._core.chat_template is not None

    @property
    def vocab_size(self) -> int:
        return self._core.vocab_size

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self._core.token_to_id(token)

    def save(self, path: str) -> None:
        self._core.save(str(path))


def _token_list(ids) -> list[int]:
    if isinstance(ids, (mx.array, np.ndarray)):
        ids = ids.reshape(-1).tolist()
    out = [int(t) for t in ids]
    bad = next((t for t in out if t < 0), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is negative: token ids are 0 or more")
    return out
