"""Vocabulary and tokenising, with the original's token scheme.

Token ids: 0 is padding in label arrays; words are 1..V; ``V+1`` is both START and END; ``V+2`` is NULL (the
input-side stand-in for padding). The language model's output classes are ``0..V``: class ``k < V`` is word
``k+1`` and class ``V`` is END (see ``LanguageModel``).
"""

from __future__ import annotations

import re
import string

# The original preprocess's replacement table (applied before lowercasing and stripping punctuation).
_REPLACEMENTS = {"½": "half", "—": "-", "™": "", "¢": "cent", "ç": "c", "û": "u", "é": "e", "°": " degree",
                 "è": "e", "…": ""}
_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")
UNK = "<UNK>"


def tokenize(text: str) -> list[str]:
    """The original ``words_preprocess``: replacements, lowercase, delete ASCII punctuation, split on whitespace.

    Unlike the original (Python 2 ``str()``), other non-ASCII characters are kept instead of raising.
    """
    for src, dst in _REPLACEMENTS.items():
        text = text.replace(src, dst)
    return _PUNCT.sub("", text.lower()).split()


class Vocabulary:
    def __init__(self, idx_to_token: list[str]):
        self.idx_to_token = list(idx_to_token)  # position i holds token id i+1
        self.token_to_idx = {t: i + 1 for i, t in enumerate(self.idx_to_token)}
        if len(self.token_to_idx) != len(self.idx_to_token):
            raise ValueError("vocabulary has duplicate tokens")

    def __len__(self) -> int:
        return len(self.idx_to_token)

    @property
    def start_token(self) -> int:
        return len(self) + 1

    @property
    def end_token(self) -> int:
        return len(self) + 1

    @property
    def null_token(self) -> int:
        return len(self) + 2

    tokenize = staticmethod(tokenize)

    def encode(self, tokens: list[str] | str, max_len: int = 15) -> list[int]:
        """Token ids padded with 0 to ``max_len``; unknown words map to ``<UNK>`` (or raise if there is none)."""
        if isinstance(tokens, str):
            tokens = tokenize(tokens)
        unk = self.token_to_idx.get(UNK)
        ids = []
        for t in tokens[:max_len]:
            i = self.token_to_idx.get(t, unk)
            if i is None:
                raise KeyError(f"word {t!r} is not in the vocabulary and it has no {UNK}")
            ids.append(i)
        return ids + [0] * (max_len - len(ids))

    def decode(self, ids) -> str:
        """Join words up to the first END or 0 (the original's ``decodeSequence``)."""
        words = []
        for i in ids:
            i = int(i)
            if i == 0 or i == self.end_token or i > len(self):
                break
            words.append(self.idx_to_token[i - 1])
        return " ".join(words)

    def to_list(self) -> list[str]:
        return list(self.idx_to_token)

    @classmethod
    def from_list(cls, tokens: list[str]) -> "Vocabulary":
        return cls(tokens)
