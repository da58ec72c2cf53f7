"""BERT's uncased WordPiece tokenizer in pure Python, from a model's ``vocab.txt``.

Why here: a device serving the prepared ``minilm`` embedding model must turn text into
``input_ids``/``attention_mask`` without installing ``transformers``/``tokenizers``. This
follows ``BertTokenizer`` (basic tokenisation: clean, split CJK characters, lower-case,
strip accents, split punctuation; then greedy longest-match WordPiece), and the tests
compare it with the ``tokenizers`` implementation when that is installed.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    # BERT treats every non-alphanumeric ASCII character as punctuation.
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F
            or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


def _clean(text: str) -> str:
    out = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C")
                                       and ch not in "\t\n\r"):
            continue  # control characters are dropped
        if _is_cjk(cp):
            out.append(f" {ch} ")  # every CJK character is its own word
        elif ch.isspace():
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


class WordPieceTokenizer:
    def __init__(self, vocab: Sequence[str], lowercase: bool = True,
                 max_length: int = 256) -> None:
        self.vocab = {token: i for i, token in enumerate(vocab)}
        self.lowercase = lowercase
        self.max_length = max_length
        self.cls_id = self.vocab["[CLS]"]
        self.sep_id = self.vocab["[SEP]"]
        self.pad_id = self.vocab["[PAD]"]
        self.unk_id = self.vocab["[UNK]"]

    @staticmethod
    def from_file(path: Path, lowercase: bool = True, max_length: int = 256) \
            -> WordPieceTokenizer:
        vocab = Path(path).read_text(encoding="utf-8").split("\n")
        if vocab and vocab[-1] == "":
            vocab.pop()
        return WordPieceTokenizer(vocab, lowercase, max_length)

    def _words(self, text: str) -> list[str]:
        words: list[str] = []
        for word in _clean(text).split():
            if self.lowercase:
                word = unicodedata.normalize("NFD", word.lower())
                word = "".join(ch for ch in word if unicodedata.category(ch) != "Mn")
            current = ""
            for ch in word:
                if _is_punctuation(ch):
                    if current:
                        words.append(current)
                    words.append(ch)
                    current = ""
                else:
                    current += ch
            if current:
                words.append(current)
        return words

    def _pieces(self, word: str) -> list[int]:
        if len(word) > 100:  # BertTokenizer's max_input_chars_per_word
            return [self.unk_id]
        ids: list[int] = []
        start = 0
        while start < len(word):
            end = len(word)
            found = None
            while start < end:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    found = self.vocab[piece]
                    break
                end -= 1
            if found is None:
                return [self.unk_id]  # one unknown piece makes the whole word unknown
            ids.append(found)
            start = end
        return ids

    def tokenize(self, text: str) -> list[int]:
        """Token ids of one text with [CLS] ... [SEP], truncated to ``max_length``."""
        ids = [i for word in self._words(text) for i in self._pieces(word)]
        return [self.cls_id, *ids[:self.max_length - 2], self.sep_id]

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """``input_ids`` and ``attention_mask`` int64[batch, longest], right-padded."""
        rows = [self.tokenize(t) for t in texts]
        width = max((len(r) for r in rows), default=0)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}
