"""Training a sentencepiece model on captions, deterministically.

Same captions (in the same order) and options → the same model file, byte for byte:
- every caption is used (input_sentence_size=0) and none is shuffled or sampled (shuffle_input_sentence=false),
  so sentencepiece's random generator (seeded anyway, `seed`) draws nothing that shapes the vocabulary;
- the trainer's thread count is fixed (`num_threads`, default 1): the unigram EM sums its expectations per
  thread, so another count rounds differently and moves piece scores (measured: 1 vs 2 threads differ);
- no file names enter the model (captions are streamed in, the model is written to memory).

Vocabulary: character_coverage=1.0 (every character of the training captions gets a piece, so those captions
never produce unk); with `byte_fallback` unknown characters of other text become UTF-8 byte pieces (256 of the
vocabulary) instead of unk. Ids: pad 0, eos 1, unk 2, no bos (see dpar_scale.text.tokenizer).
"""
from __future__ import annotations

import io
from typing import Iterable

from dpar_scale.text.tokenizer import TextTokenizer, TextTokenizerError

__all__ = ["MODEL_TYPES", "train_text_tokenizer"]

MODEL_TYPES = ("unigram", "bpe")
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def train_text_tokenizer(captions: Iterable[str], vocab_size: int, model_type: str = "unigram",
                         byte_fallback: bool = False, num_threads: int = 1, seed: int = 0) -> TextTokenizer:
    """A sentencepiece model of exactly `vocab_size` pieces trained on `captions` (see the module docstring)."""
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise TextTokenizerError(f"model type {model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    captions = [c for c in captions if c.strip()]
    if not captions:
        raise TextTokenizerError("no captions to train the text tokenizer on (every one was empty)")
    floor = 3 + (256 if byte_fallback else 0)
    if vocab_size <= floor:
        raise TextTokenizerError(f"--vocab-size {vocab_size} leaves no room for pieces: pad, eos and unk take 3 ids"
                                 f"{' and byte fallback 256' if byte_fallback else ''}; use more than {floor}")
    spm.set_random_generator_seed(seed)
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(captions), model_writer=out, vocab_size=vocab_size, model_type=model_type,
            input_sentence_size=0, shuffle_input_sentence=False, num_threads=num_threads, character_coverage=1.0,
            byte_fallback=byte_fallback, hard_vocab_limit=True, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            bos_id=-1, minloglevel=2)
    except RuntimeError as e:
        message = str(e).split("] ")[-1]
        if "too high" in message:
            message += " (these captions hold fewer distinct pieces: lower --vocab-size or train on more captions)"
        elif "required_chars" in message:
            message += (" (every character of the captions needs a piece, plus 256 byte pieces with byte "
                        "fallback: raise --vocab-size)")
        raise TextTokenizerError(f"sentencepiece could not train a {vocab_size}-piece {model_type} model: "
                                 f"{message}") from None
    return TextTokenizer(out.getvalue(), source=f"<trained {model_type} {vocab_size}>")
