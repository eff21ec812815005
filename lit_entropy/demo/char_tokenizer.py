"""The character-level tokenizer of the embedded model, built offline (no download, no training)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

#: Special tokens of the character tokenizer, in id order (``<pad>`` = 0, ``<eos>`` = 1, ``<unk>`` = 2).
CHAR_SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>", "<unk>")

#: Ordinary tokens of the character tokenizer: printable ASCII (space included) then newline.
CHAR_VOCAB: tuple[str, ...] = tuple(chr(code) for code in range(32, 127)) + ("\n",)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Build a character-level tokenizer with no download and no training.

    Every printable ASCII character (codes 32..126, space included) and ``"\\n"`` is one token, so
    ``"5+7"`` encodes to 3 ids and decoding returns exactly the original text. Characters outside the
    vocabulary become ``<unk>``.

    Returns:
        A fast tokenizer with vocabulary size ``3 + 96 = 99``: ``<pad>`` (id 0), ``<eos>`` (id 1),
        ``<unk>`` (id 2), then the characters. No BOS token, no chat template, left padding.
    """
    # Imported here: only this builder needs the low-level library.
    from tokenizers import Tokenizer, decoders, models

    vocab = {token: idx for idx, token in enumerate(CHAR_SPECIAL_TOKENS + CHAR_VOCAB)}
    # A BPE model with no merges and no pre-tokenizer splits any text into single vocabulary characters,
    # keeping spaces and newlines as tokens of their own.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    # Without a decoder `tokenizers` joins tokens with spaces; Fuse concatenates them verbatim.
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(CHAR_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        # The default clean-up would rewrite " ." as "." and break the exact round trip.
        clean_up_tokenization_spaces=False,
    )
