"""A character-level tokenizer in Hugging Face format, built locally (no downloads).

Each character of the alphabet is one token; ``<pad>`` (id 0), ``<eos>`` (id 1) and ``<unk>`` (id 2) are
special. Nothing is added around the text on encoding (no bos): a prompt encodes to exactly its
characters, and the caller appends eos to training targets. Padding is on the left, as batched
generation needs.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
RESERVED_TOKENS = (PAD, EOS, UNK)


DIGITS = "0123456789"
DIGIT_PAIRS = tuple(a + b for a in DIGITS for b in DIGITS)  # "00" .. "99"
DIGIT_OPERATORS = tuple(d + op for d in DIGITS for op in "*+=;:")  # a digit and the operator after it: "7*", "2;"
MERGES = {"digit-pairs": DIGIT_PAIRS, "digit-operators": DIGIT_OPERATORS}  # the demo's other tokenizers


def build_tokenizer(alphabet: str = "0123456789*+=;:", *, merges: tuple[str, ...] | list[str] = ()
                    ) -> PreTrainedTokenizerFast:
    """A char-level ``PreTrainedTokenizerFast`` over ``alphabet`` (ids: specials first, then the alphabet).

    ``merges``: multi-character tokens (ids after the alphabet), cut greedily from the left, longest first
    ("12345" with ``DIGIT_PAIRS`` -> "12" "34" "5"): the same task under another tokenizer, for the
    cross-tokenizer demonstration (docs/cross_tokenizer.md). Save it with ``save_pretrained``;
    ``AutoTokenizer.from_pretrained`` loads it back without this module.
    """
    from transformers import PreTrainedTokenizerFast  # deferred: keeps `import reopold.tasks` light

    chars = list(dict.fromkeys(alphabet))  # de-duplicate, keep order
    if any(len(c) != 1 or c.isspace() for c in chars):
        raise ValueError(f"alphabet must be single non-space characters, got {alphabet!r}")
    merged = list(dict.fromkeys(merges))
    if any(len(m) < 2 or set(m) - set(chars) for m in merged):
        raise ValueError(f"merges must be strings of two or more characters of the alphabet, got {merged[:5]}")
    vocab = {tok: i for i, tok in enumerate([*RESERVED_TOKENS, *chars, *merged])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    pattern = "|".join([*(re.escape(m) for m in sorted(merged, key=len, reverse=True)), "."])
    core.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")  # one token per piece
    core.decoder = decoders.Fuse()  # join tokens without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        model_max_length=256,
    )
