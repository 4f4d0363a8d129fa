"""The capstone corpus: deterministic from its seed, a fixed vocabulary, exact round trips."""

from __future__ import annotations

import pytest
import torch

from minipipe.course.corpus import GRAMMAR, Vocab, batches, corpus, split


def test_the_same_seed_gives_the_same_text():
    assert corpus(300, seed=3) == corpus(300, seed=3)
    assert corpus(300, seed=3) != corpus(300, seed=4)
    assert corpus(50, seed=1) == corpus(300, seed=1)[:len(corpus(50, seed=1))]  # a prefix


def test_text_is_one_sentence_per_line_from_the_grammar():
    lines = corpus(200, seed=0).splitlines()
    assert len(lines) == 200
    words = {w for prods in GRAMMAR.values() for prod in prods for w in prod if w not in GRAMMAR}
    for line in lines:
        assert line.endswith(".")
        for word in line.replace(",", " ").replace(".", " ").split():
            assert word in words, (word, line)


def test_vocabulary_does_not_depend_on_the_seed():
    vocab = Vocab.for_corpus()
    for seed in range(5):
        assert Vocab.from_text(corpus(2000, seed)) == vocab
    assert list(vocab.chars) == sorted(vocab.chars) and len(set(vocab.chars)) == len(vocab)


@pytest.mark.parametrize("seed", [0, 7])
def test_encode_decode_round_trip(seed):
    vocab = Vocab.for_corpus()
    text = corpus(100, seed)
    ids = vocab.encode(text)
    assert ids.dtype == torch.int64 and ids.shape == (len(text),)
    assert int(ids.min()) >= 0 and int(ids.max()) < len(vocab)
    assert vocab.decode(ids) == text
    assert vocab.decode(ids.tolist()) == text
    assert torch.equal(vocab.encode(vocab.decode(ids)), ids)


def test_encode_names_unknown_characters():
    with pytest.raises(ValueError, match="'Z'"):
        Vocab.for_corpus().encode("the Zebra")


def test_batches_are_deterministic_shifted_windows():
    ids = Vocab.for_corpus().encode(corpus(200))
    first = batches(ids, steps=3, batch=4, context=16, seed=5)
    again = batches(ids, steps=3, batch=4, context=16, seed=5)
    other = batches(ids, steps=3, batch=4, context=16, seed=6)
    assert len(first) == 3
    for (x, y), (x2, y2) in zip(first, again):
        assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    text = Vocab.for_corpus().decode(ids)
    x, y = first[0]
    window = Vocab.for_corpus().decode(torch.cat([x[0], y[0, -1:]]))
    assert window in text  # each row is a real stretch of the corpus


def test_split_and_errors():
    ids = torch.arange(100)
    train_ids, valid_ids = split(ids, valid=0.2)
    assert torch.equal(torch.cat([train_ids, valid_ids]), ids) and len(valid_ids) == 20
    with pytest.raises(ValueError, match="context"):
        batches(torch.arange(8), steps=1, batch=2, context=8)
    with pytest.raises(ValueError):
        corpus(0)
