"""The KV routing benchmark's workloads: prompts made of seeded random words, no I/O.

The frontend's built-in tokenizer makes one token of each whitespace-separated word, so a text
of ``n`` words is ``n`` tokens and a prompt that extends another one shares its leading blocks.

- :class:`ChatSpec` / :func:`make_conversations`: the prefix-sharing multi-turn workload. A few
  shared system prompts; each user's conversation opens with one of them and grows turn by
  turn: the next prompt is the previous prompt, the previous answer and a new user message.
- :class:`PrefixSpec` / :func:`make_prefix_prompts`: NVIDIA Dynamo's KV router benchmark
  workload (aiperf): a few long shared prefixes, each request one of them plus a unique tail.
- :func:`distinct_blocks` sizes a workload in KV blocks, to size the workers' caches from it.

Everything is deterministic: the same spec gives the same words in every process.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from troupe.demo.mocker import VOCABULARY as ANSWER_WORDS
from troupe.frontend import WordTokenizer
from troupe.kv import block_hashes

__all__ = [
    "ChatSpec",
    "Conversation",
    "PrefixSpec",
    "answer_text",
    "chat_prompts",
    "distinct_blocks",
    "make_conversations",
    "make_prefix_prompts",
    "make_vocabulary",
]

VOCABULARY_SIZE = 5_000


def make_vocabulary(rng: random.Random, size: int = VOCABULARY_SIZE) -> list[str]:
    """``size`` distinct lower-case words of 3-9 letters."""
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))))
    return sorted(words)


def _text(rng: random.Random, vocabulary: Sequence[str], words: int) -> str:
    return " ".join(rng.choices(vocabulary, k=words))


def answer_text(tokens: int) -> str:
    """What the mock engine answers when asked for ``tokens`` tokens (its words, cycled)."""
    return " ".join(ANSWER_WORDS[i % len(ANSWER_WORDS)] for i in range(tokens))


@dataclass(frozen=True)
class ChatSpec:
    """The multi-turn workload's shape.

    Attributes:
        users: conversations, one per user.
        system_prompts: shared system prompts; user ``i`` opens with prompt ``i % system_prompts``.
        system_words: words (tokens) of each system prompt.
        message_words: (least, most) words of a user message.
        turns: (least, most) turns of a conversation.
        answer_tokens: (least, most) tokens of an answer (each turn's ``max_tokens``).
        seed: the random words' seed.
    """

    users: int = 32
    system_prompts: int = 8
    system_words: int = 1_000
    message_words: tuple[int, int] = (50, 150)
    turns: tuple[int, int] = (4, 6)
    answer_tokens: tuple[int, int] = (8, 16)
    seed: int = 2026


@dataclass(frozen=True)
class Conversation:
    """One user's conversation: its system prompt, then per turn a message and the answer's
    length (``max_tokens``)."""

    user: int
    system: str
    messages: tuple[str, ...]
    max_tokens: tuple[int, ...]

    @property
    def turns(self) -> int:
        return len(self.messages)

    def prompt(self, turn: int, previous_prompt: str, previous_answer: str) -> str:
        """The prompt of ``turn``: the system prompt and the first message, or the previous
        prompt, the previous answer and this turn's message."""
        if turn == 0:
            return f"{self.system} {self.messages[0]}"
        return f"{previous_prompt} {previous_answer} {self.messages[turn]}"


def make_conversations(spec: ChatSpec) -> list[Conversation]:
    """Every user's conversation, from ``spec.seed``."""
    rng = random.Random(spec.seed)
    vocabulary = make_vocabulary(rng)
    systems = [_text(rng, vocabulary, spec.system_words) for _ in range(spec.system_prompts)]
    conversations = []
    for user in range(spec.users):
        turns = rng.randint(*spec.turns)
        messages = tuple(
            _text(rng, vocabulary, rng.randint(*spec.message_words)) for _ in range(turns)
        )
        lengths = tuple(rng.randint(*spec.answer_tokens) for _ in range(turns))
        conversations.append(
            Conversation(user, systems[user % spec.system_prompts], messages, lengths)
        )
    return conversations


def chat_prompts(conversation: Conversation) -> list[str]:
    """The conversation's prompts, turn by turn, with the mock engine's answers."""
    prompts: list[str] = []
    prompt = answer = ""
    for turn in range(conversation.turns):
        prompt = conversation.prompt(turn, prompt, answer)
        prompts.append(prompt)
        answer = answer_text(conversation.max_tokens[turn])
    return prompts


@dataclass(frozen=True)
class PrefixSpec:
    """NVIDIA Dynamo's KV router benchmark workload (its aiperf run), on the mock engine.

    Attributes:
        prefixes: shared prefixes.
        prefix_words: words (tokens) of each prefix.
        unique_words: words (tokens) after the prefix, new in every request.
        requests: requests in the run; each draws its prefix at random.
        output_tokens: tokens per answer.
        seed: the random words' seed.
    """

    prefixes: int = 8
    prefix_words: int = 4_000
    unique_words: int = 100
    requests: int = 320
    output_tokens: int = 20
    seed: int = 4_000


def make_prefix_prompts(spec: PrefixSpec) -> list[str]:
    """The run's prompts, in the order they are sent."""
    rng = random.Random(spec.seed)
    vocabulary = make_vocabulary(rng)
    prefixes = [_text(rng, vocabulary, spec.prefix_words) for _ in range(spec.prefixes)]
    return [
        f"{rng.choice(prefixes)} {_text(rng, vocabulary, spec.unique_words)}"
        for _ in range(spec.requests)
    ]


def distinct_blocks(prompts: Iterable[str], block_size: int) -> int:
    """Distinct full KV blocks over ``prompts`` (as the frontend tokenizes them)."""
    encode = WordTokenizer().encode
    seen: set[int] = set()
    for prompt in prompts:
        seen.update(block_hashes(encode(prompt), block_size))
    return len(seen)
