"""Prompts to token ids: the :class:`Tokenizer` seam and the built-in :class:`WordTokenizer`.

The frontend tokenizes each prompt and sends the ids with the request (``token_ids`` in the
engine protocol), so that routers can match a request's KV-cache blocks without a tokenizer of
their own, and the mock engine (:mod:`troupe.demo.mocker`) tokenizes a request that carries none
with the same function, so both sides agree on the ids.

The built-in tokenizer needs no download and gives the same ids for the same text in every
process and on every machine: each whitespace-separated word is one token, its id a CRC-32 of its
UTF-8 bytes folded into a 32,000-word vocabulary (Python's ``hash()`` is salted per process, so it
is not used). A hash cannot be reversed, so it has no ``decode``; troupe never needs one. A real
tokenizer (a HuggingFace one, say) plugs in through :class:`Tokenizer`: anything with
``encode(text) -> list[int]``.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

from troupe.errors import InvalidRequest

__all__ = ["VOCAB_SIZE", "Tokenizer", "WordTokenizer", "prompt_text"]

VOCAB_SIZE: Final = 32_000
"""The built-in tokenizer's vocabulary: its ids are ``0 .. VOCAB_SIZE - 1``."""


@runtime_checkable
class Tokenizer(Protocol):
    """What the frontend and the mock engine need of a tokenizer.

    A HuggingFace tokenizer fits with a two-line adapter whose ``encode`` calls
    ``tokenizer.encode(text, add_special_tokens=False)``. ``encode`` is called on the event loop
    for every request: it must not block for long.
    """

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text``."""
        ...


@dataclass(frozen=True, slots=True)
class WordTokenizer:
    """One token per whitespace-separated word; its id a stable hash of the word.

    Attributes:
        vocab_size: ids are ``crc32(word) % vocab_size``.
    """

    vocab_size: int = VOCAB_SIZE

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, not {self.vocab_size}")

    def encode(self, text: str) -> list[int]:
        """The ids of the words of ``text`` (same text, same ids, in every process)."""
        size = self.vocab_size
        crc = zlib.crc32
        return [crc(word.encode("utf-8", "surrogatepass")) % size for word in text.split()]


def prompt_text(request: Mapping[str, Any]) -> str:
    """The text of an engine request's prompt, as a tokenizer sees it.

    A completion's ``prompt``; a chat's ``messages`` rendered one ``role: content`` line each
    (the plain rendering: no model's chat template).

    Raises:
        InvalidRequest: neither a string ``prompt`` nor a list of text messages.
    """
    prompt = request.get("prompt")
    if isinstance(prompt, str):
        return prompt
    messages = request.get("messages")
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise InvalidRequest(
            "expected an engine request with a string prompt or text messages", param="prompt"
        )
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
