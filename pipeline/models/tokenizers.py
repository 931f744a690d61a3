"""Tiny CLIP tokenizers built from locally generated vocab files (no download).

The vocabulary has the same shape as CLIP's: the 256 byte-level characters, their end-of-word ``</w>``
forms, the results of a few merges, then ``<|startoftext|>`` and ``<|endoftext|>`` last (so the end token
has the largest id, as in CLIP, and "argmax of ids" finds it). Any text encodes, since every byte has a
token; the merges only make common prompt words shorter.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# Words that appear in castlora's prompts; each gets a chain of merges so it becomes one token.
_MERGE_WORDS = ("a", "photo", "of", "the", "and", "dog", "cat", "toy", "person", "with", "in")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map: byte-level BPE never sees whitespace bytes.

    Printable Latin-1 bytes map to themselves; the remaining 68 bytes are shifted to code points 256+.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def _chain_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Left-to-right merges that fuse each word into a single ``word</w>`` token (deduplicated, in order)."""
    merges: list[tuple[str, str]] = []
    for word in words:
        if len(word) < 2:
            continue
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        current = symbols[0]
        for symbol in symbols[1:]:
            pair = (current, symbol)
            if pair not in merges:
                merges.append(pair)
            current += symbol
    return merges


def tiny_clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP-ordered vocabulary: bytes, bytes + ``</w>``, merge results, then the two special tokens."""
    byte_chars = list(bytes_to_unicode().values())
    tokens = [*byte_chars, *(char + END_OF_WORD for char in byte_chars)]
    tokens += ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}


def write_tiny_clip_tokenizer(target_dir: Path, model_max_length: int = 77, pad_token: str = EOS_TOKEN) -> None:
    """Write a loadable byte-level BPE CLIP tokenizer to ``target_dir``.

    ``pad_token`` defaults to CLIP's end token; SDXL's second tokenizer pads with ``"!"``, which the
    tiny SDXL mirrors so padding behaves like the real model's.
    """
    target_dir = Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    merges = _chain_merges(_MERGE_WORDS)
    vocab = tiny_clip_vocab(merges)
    # The classic slow-tokenizer files, written first so the directory is self-describing even before
    # save_pretrained adds tokenizer.json (which save_pretrained may rewrite these alongside).
    (target_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2", *(f"{left} {right}" for left, right in merges)]
    (target_dir / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
        pad_token=pad_token,
    )
    tokenizer.save_pretrained(target_dir)
