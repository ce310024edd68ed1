"""Character-level tokenizers for the built-in toy tasks, built with the `tokenizers` library.

Built by hand (a WordLevel vocabulary over single characters) because no pretrained tokenizer can be
downloaded at run time and a character vocabulary keeps the toy MDPs exact: one token per node/digit.
The result is a regular `PreTrainedTokenizerFast`, saved next to every checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def build_char_tokenizer(
    chars: Sequence[str],
    special_tokens: Sequence[str] = (),
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """A tokenizer with ids `<pad>`=0, `<eos>`=1, `<unk>`=2, then `special_tokens`, then one id per char.

    Special tokens are matched whole before the text is split into characters; decoding concatenates
    tokens without spaces.
    """
    if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
        raise ValueError("chars must be distinct single characters")
    names = [PAD, EOS, UNK, *special_tokens, *chars]
    vocab = {tok: i for i, tok in enumerate(names)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=list(special_tokens),
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
