"""A small character-level corpus for the capstone, generated from a grammar: no downloads.

Sentences about pipelines ("the idle rank waits for a gradient.") come from a tiny
context-free grammar and a seeded random generator, so the same seed gives the same text on
every machine. The vocabulary is every character the grammar can write, so it does not depend
on the seed either. A model that learns this corpus learns to spell the words, to put them in
grammatical order, and to end sentences.

Example:
    >>> text = corpus(3, seed=0)
    >>> vocab = Vocab.for_corpus()
    >>> vocab.decode(vocab.encode(text)) == text
    True
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["GRAMMAR", "corpus", "Vocab", "batches", "split"]

#: The grammar: symbol -> list of productions (each a list of symbols or words).
GRAMMAR: dict[str, list[list[str]]] = {
    "S": [["NP", "VP", "."], ["NP", "VP", "."], ["when", "NP", "VP", ",", "NP", "VP", "."]],
    "NP": [["the", "N"], ["the", "ADJ", "N"], ["a", "ADJ", "N"], ["each", "N"]],
    "VP": [["V", "NP"], ["waits", "for", "NP"], ["sends", "NP", "to", "NP"], ["is", "ADJ"]],
    "N": [["rank"], ["stage"], ["batch"], ["gradient"], ["layer"], ["message"], ["device"]],
    "ADJ": [["first"], ["last"], ["idle"], ["busy"], ["small"], ["slow"], ["next"]],
    "V": [["holds"], ["computes"], ["receives"], ["frees"], ["checks"]],
}

_PUNCT = {".", ","}


def _expand(symbol: str, rng: random.Random, out: list[str]) -> None:
    if symbol not in GRAMMAR:
        out.append(symbol)
        return
    for part in rng.choice(GRAMMAR[symbol]):
        _expand(part, rng, out)


def sentence(rng: random.Random) -> str:
    """One sentence drawn from :data:`GRAMMAR` with ``rng``."""
    words: list[str] = []
    _expand("S", rng, words)
    text = ""
    for w in words:
        text += w if (w in _PUNCT or not text) else " " + w
    return text


def corpus(sentences: int = 2000, seed: int = 0) -> str:
    """``sentences`` sentences, one per line; the same text for the same ``seed`` everywhere."""
    if sentences < 1:
        raise ValueError(f"need at least one sentence, got {sentences}")
    rng = random.Random(seed)
    return "\n".join(sentence(rng) for _ in range(sentences)) + "\n"


@dataclass(frozen=True)
class Vocab:
    """Characters <-> integer ids (sorted characters, so the ids are stable)."""

    chars: tuple[str, ...]

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        """Every distinct character of ``text``."""
        return cls(tuple(sorted(set(text))))

    @classmethod
    def for_corpus(cls) -> Vocab:
        """Every character the grammar can write (the same for any seed or corpus size)."""
        chars = {"\n", " "}
        for productions in GRAMMAR.values():
            for prod in productions:
                for w in prod:
                    if w not in GRAMMAR:
                        chars.update(w)
        return cls(tuple(sorted(chars)))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """``text`` -> ``(len(text),)`` int64 ids.

        Raises:
            ValueError: a character outside the vocabulary (named).
        """
        index = {c: i for i, c in enumerate(self.chars)}
        missing = sorted(set(text) - set(index))
        if missing:
            raise ValueError(f"characters not in the vocabulary: {missing!r}")
        return torch.tensor([index[c] for c in text], dtype=torch.int64)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """ids (a 1-d tensor or a list) -> text."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return "".join(self.chars[int(i)] for i in values)


def split(ids: torch.Tensor, valid: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``1 − valid`` of the ids for training, the rest for validation."""
    cut = int(len(ids) * (1 - valid))
    return ids[:cut], ids[cut:]


def batches(ids: torch.Tensor, steps: int, batch: int, context: int,
            seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` next-character batches ``(x, y)`` of random windows, drawn from ``seed``.

    ``x`` is ``(batch, context)`` ids, ``y`` the same windows shifted by one character: the
    targets of a language model (``models.gpt_loss``). Pass the list to ``train(data=...)``.

    Raises:
        ValueError: the text is not longer than ``context``.
    """
    if len(ids) <= context:
        raise ValueError(f"the text has {len(ids)} characters; a window of context {context} "
                         "needs more")
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        start = torch.randint(0, len(ids) - context, (batch,), generator=g)
        windows = torch.stack([ids[s:s + context + 1] for s in start.tolist()])  # (batch, T + 1)
        out.append((windows[:, :-1].clone(), windows[:, 1:].clone()))
    return out
