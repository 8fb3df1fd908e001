"""A CLIPTokenizer built offline from the shapes grammar's vocabulary.

The vocabulary is CLIP's byte-level alphabet (256 symbols, each also with the end-of-word marker
``</w>``), the tokens made by byte-pair merges learned here on the grammar's words (so every grammar
word is one token), and the two special tokens last: ``<|startoftext|>`` then ``<|endoftext|>``. The
end-of-text token has the largest id, as in CLIP, so open_clip's ``argmax`` pooling finds it. Text
outside the grammar still tokenizes (into characters and word pieces).
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer

from dmquant.zoo.data import vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 32


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode symbols."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE on ``words`` (each counted once) until every word is a single token.

    Ties between equally frequent pairs are broken by the pair's text, so the result is deterministic.
    """
    segs = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in segs.values()):
        counts: Counter[tuple[str, str]] = Counter()
        for s in segs.values():
            counts.update(zip(s[:-1], s[1:]))
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for w, s in segs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segs[w] = tuple(out)
    return merges


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    base = list(_bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base]
    merges = learn_merges(vocabulary())
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_files(folder: str | Path) -> Path:
    """Write vocab.json and merges.txt (CLIP format) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def build_tokenizer(folder: str | Path | None = None):
    """A ``transformers.CLIPTokenizer`` for the grammar (files written to ``folder`` or a temp dir)."""
    if folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            write_tokenizer_files(tmp)
            return CLIPTokenizer.from_pretrained(tmp, model_max_length=MODEL_MAX_LENGTH)
    write_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=MODEL_MAX_LENGTH)
