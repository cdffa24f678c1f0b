"""A character-level tokenizer in Hugging Face format, built locally (no downloads).

Each character of the alphabet is one token; ``<pad>`` (id 0), ``<eos>`` (id 1) and ``<unk>`` (id 2) are
special. Nothing is added around the text on encoding (no bos): a prompt encodes to exactly its
characters, and the caller appends eos to training targets. Padding is on the left, as batched
generation needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)


def build_tokenizer(alphabet: str = "0123456789*+=;:") -> PreTrainedTokenizerFast:
    """A char-level ``PreTrainedTokenizerFast`` over ``alphabet`` (ids: specials first, then the alphabet).

    Save it with ``save_pretrained``; ``AutoTokenizer.from_pretrained`` loads it back without this module.
    """
    from transformers import PreTrainedTokenizerFast  # deferred: keeps `import reopold.tasks` light

    chars = list(dict.fromkeys(alphabet))  # de-duplicate, keep order
    if any(len(c) != 1 or c.isspace() for c in chars):
        raise ValueError(f"alphabet must be single non-space characters, got {alphabet!r}")
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *chars])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()  # join tokens without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        model_max_length=256,
    )
