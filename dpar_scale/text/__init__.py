"""Text: owns text tokenization — a sentencepiece model as the text-conditioned models use it (`TextTokenizer`),
training one on captions (`train_text_tokenizer`), carrying it inside checkpoints and exports as bytes, and the
checks that a model file matches the one a checkpoint recorded or a config names.

Conventions every text model follows (dpar_scale.text.tokenizer): no bos; every caption ends with eos; the
empty caption is [eos] (one token), so a text prefix is never empty; captions longer than model.text.max_length
keep their first max_length - 1 tokens and the eos, and are counted.

May import: config (and errors). Nothing here knows about images, models or ranks; data/ receives a tokenizer as
an argument, so it does not import this room either.
"""
from dpar_scale.text.tokenizer import (
    TextTokenizer, TextTokenizerError, check_text_config, check_text_tokenizer, load_text_tokenizer,
)
from dpar_scale.text.training import train_text_tokenizer

__all__ = ["TextTokenizer", "TextTokenizerError", "check_text_config", "check_text_tokenizer",
           "load_text_tokenizer", "train_text_tokenizer"]
