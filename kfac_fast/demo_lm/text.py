"""The demo's corpus: English-like text from a small stochastic grammar, made on the fly.

No download and no data file: `make_text(n_chars, seed)` writes sentences with
determiners, adjectives, plural nouns that the verb must agree with across the adjectives
and an optional relative clause, prepositional phrases and commas. A character model has
to learn spelling, word order and agreement, so the loss keeps falling for a few hundred
steps and optimisers separate. `Corpus` turns the text into token ids (one per character)
and draws (input, target) windows.
"""
from __future__ import annotations

import random

import torch

DETERMINERS = ("the", "a", "every", "some", "this", "that", "my", "our")
PLURAL_DETERMINERS = ("the", "some", "many", "few", "these", "those", "our", "all")
ADJECTIVES = ("small", "green", "quiet", "old", "bright", "heavy", "young", "slow", "clever", "round",
              "cold", "gentle", "brave", "empty", "golden", "sharp")
NOUNS = ("dog", "river", "teacher", "engine", "garden", "window", "farmer", "story", "mountain", "letter",
         "bird", "lamp", "sailor", "forest", "kettle", "poet", "bridge", "cloud")
VERBS = ("see", "carry", "follow", "paint", "remember", "find", "open", "watch", "answer", "build",
         "visit", "draw", "hear", "praise")
INTRANSITIVE = ("sleep", "wait", "sing", "shine", "wander", "rest", "listen")
PREPOSITIONS = ("near", "under", "behind", "beside", "across", "above")
ADVERBS = ("slowly", "again", "quietly", "today", "often", "gladly")


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def _third_person(verb: str) -> str:
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + ("es" if verb.endswith(("s", "sh", "ch", "x", "o")) else "s")


class _Writer:
    def __init__(self, rng: random.Random) -> None:
        self.r = rng

    def noun_phrase(self, depth: int = 0) -> tuple[str, bool]:
        """(text, plural)."""
        plural = self.r.random() < 0.4
        det = self.r.choice(PLURAL_DETERMINERS if plural else DETERMINERS)
        adjs = self.r.sample(ADJECTIVES, k=self.r.choice((0, 0, 1, 1, 2)))
        noun = self.r.choice(NOUNS)
        words = [det, *adjs, _plural(noun) if plural else noun]
        if det == "a" and words[1][0] in "aeiou":
            words[0] = "an"
        if depth == 0 and self.r.random() < 0.25:
            inner, _ = self.noun_phrase(depth + 1)
            words += [self.r.choice(PREPOSITIONS), inner]
        return " ".join(words), plural

    def verb_phrase(self, plural: bool) -> str:
        if self.r.random() < 0.3:
            verb = self.r.choice(INTRANSITIVE)
            words = [verb if plural else _third_person(verb)]
        else:
            verb = self.r.choice(VERBS)
            obj, _ = self.noun_phrase(1)
            words = [verb if plural else _third_person(verb), obj]
        if self.r.random() < 0.3:
            words.append(self.r.choice(ADVERBS))
        return " ".join(words)

    def sentence(self) -> str:
        subject, plural = self.noun_phrase()
        if self.r.random() < 0.3:  # a relative clause between the subject and its verb
            verb = self.r.choice(VERBS)
            obj, _ = self.noun_phrase(1)
            subject += f" that {verb if plural else _third_person(verb)} {obj},"
        text = f"{subject} {self.verb_phrase(plural)}"
        if self.r.random() < 0.2:
            second, second_plural = self.noun_phrase(1)
            text += f", and {second} {self.verb_phrase(second_plural)}"
        return text + "."


def make_text(n_chars: int, seed: int) -> str:
    """At least `n_chars` characters of sentences (lower case, ' ', ',', '.', '\\n')."""
    writer = _Writer(random.Random(seed))
    parts: list[str] = []
    total = 0
    while total < n_chars:
        s = writer.sentence() + ("\n" if writer.r.random() < 0.15 else " ")
        parts.append(s)
        total += len(s)
    return "".join(parts)[:n_chars]


class Corpus:
    """Character ids of a training and a validation text (different grammar seeds)."""

    def __init__(self, train_chars: int = 200_000, val_chars: int = 20_000, seed: int = 0) -> None:
        train, val = make_text(train_chars, seed), make_text(val_chars, seed + 10_000)
        self.alphabet = sorted(set(train) | set(val))
        index = {c: i for i, c in enumerate(self.alphabet)}
        self.train = torch.tensor([index[c] for c in train], dtype=torch.long)
        self.val = torch.tensor([index[c] for c in val], dtype=torch.long)

    @property
    def vocab(self) -> int:
        return len(self.alphabet)

    def batch(self, data: torch.Tensor, size: int, context: int, gen: torch.Generator) -> tuple:
        """(inputs, targets), each (size, context): random windows and the next characters."""
        start = torch.randint(0, data.numel() - context - 1, (size,), generator=gen)
        offsets = torch.arange(context)
        x = data[start[:, None] + offsets]
        return x, data[start[:, None] + offsets + 1]

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.alphabet[int(i)] for i in ids)
