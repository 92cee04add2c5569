"""A sentencepiece model as the text-conditioned models use it.

Ids: whatever the model file defines for unk / eos / pad (ours: pad 0, eos 1, unk 2, no bos — T5's layout; T5's
spiece.model is the same, LLaMA's tokenizer.model has unk 0, bos 1, eos 2 and no pad). A caption is encoded as
its pieces followed by eos, never with bos: the last position of the text prefix is then always eos, the one the
first image position is predicted from, whatever the caption — and the empty caption is just [eos], the
unconditional input classifier-free guidance needs. A model without eos is refused. `pad_id` is the model's pad,
or eos where it has none: an id for positions that are masked anyway (packed batches need none).

Characters the model does not know: a model trained with byte fallback spells them as UTF-8 byte pieces (decode
gives them back); otherwise they become unk, which `count_unknown` counts. Text that looks like a control piece
("</s>") is encoded as ordinary characters, so a caption cannot end itself early.

The model travels as its file's bytes (`to_bytes` / `from_bytes`, `save`), identified by their sha256: a
checkpoint or an export stores the file and `identity()`, and `check_text_tokenizer` refuses a different model.
"""
from __future__ import annotations

import hashlib
import os

from dpar_scale.errors import DparError, MissingFileError

__all__ = ["TextTokenizer", "TextTokenizerError", "load_text_tokenizer", "check_text_tokenizer",
           "check_text_config"]


class TextTokenizerError(DparError, ValueError):
    """A text model that cannot be used, or that does not match the one a checkpoint or config expects."""


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class TextTokenizer:
    """encode / decode captions, `vocab_size`, `eos_id` / `unk_id` / `pad_id`, `empty_ids`, `sha256`."""

    def __init__(self, model_bytes: bytes, source: str = "<bytes>"):
        import sentencepiece as spm

        self.source = source
        self._bytes = bytes(model_bytes)
        self.sha256 = hashlib.sha256(self._bytes).hexdigest()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._bytes)
        except (RuntimeError, OSError, TypeError) as e:
            raise TextTokenizerError(f"{source} is not a sentencepiece model ({str(e).splitlines()[0][:200]}); "
                                     f"give a .model file written by sentencepiece (tools/train_text_tokenizer.py "
                                     f"writes one)") from None
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise TextTokenizerError(f"{source} has no eos piece: every caption ends with eos in our text models "
                                     f"(and the empty caption is [eos]); use a model with one (T5's, LLaMA's, or "
                                     f"one from tools/train_text_tokenizer.py)")
        self.unk_id = int(self._sp.unk_id())
        pad = int(self._sp.pad_id())
        self.pad_id = pad if pad >= 0 else self.eos_id
        self.byte_fallback = any(self._sp.is_byte(i) for i in range(self.vocab_size))

    # --------------------------------------------------------------------------------------------- files
    @classmethod
    def load(cls, path: str) -> "TextTokenizer":
        if not os.path.isfile(path):
            raise MissingFileError(f"text tokenizer {path!r} does not exist: train one with tools/"
                                   f"train_text_tokenizer.py --captions CAPTIONS.jsonl --vocab-size V --out {path}, "
                                   f"or give an existing sentencepiece model (e.g. T5's spiece.model)")
        with open(path, "rb") as f:
            return cls(f.read(), source=path)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> "TextTokenizer":
        return cls(data, source)

    def to_bytes(self) -> bytes:
        """The model file's bytes, exactly as loaded (their sha256 is `sha256`)."""
        return self._bytes

    def save(self, path: str) -> None:
        """Write the model file (atomically: a temporary name, fsync, rename) — e.g. into a checkpoint folder."""
        _write_atomic(path, self._bytes)

    def identity(self) -> dict:
        """What a checkpoint records about its text model (compared by check_text_tokenizer)."""
        return {"sha256": self.sha256, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "unk_id": self.unk_id, "byte_fallback": self.byte_fallback}

    # ------------------------------------------------------------------------------------------ encoding
    @property
    def empty_ids(self) -> list[int]:
        """The empty caption: [eos]."""
        return [self.eos_id]

    def encode(self, text: str) -> list[int]:
        """The caption's piece ids followed by eos (no bos)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [ids + [self.eos_id] for ids in self._sp.encode(list(texts), out_type=int)]

    def encode_captions(self, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
        """Each caption's ids, at most `max_length` long (a longer one keeps its first max_length - 1 pieces and
        the eos), and how many were truncated."""
        if max_length < 2:
            raise TextTokenizerError(f"max_length must be >= 2 (a piece and the eos), got {max_length}")
        out, truncated = [], 0
        for ids in self.encode_batch(texts):
            if len(ids) > max_length:
                ids = ids[:max_length - 1] + [self.eos_id]
                truncated += 1
            out.append(ids)
        return out, truncated

    def decode(self, ids) -> str:
        """Text of `ids`, eos and pad dropped."""
        keep = [int(i) for i in ids if int(i) not in (self.eos_id, self.pad_id)]
        return self._sp.decode(keep)

    def pieces(self, text: str) -> list[str]:
        return list(self._sp.encode(text, out_type=str))

    def count_unknown(self, ids) -> int:
        """unk ids in `ids` (a list of ids or a list of such lists): characters the model could not spell (a run of
        them is one unk)."""
        flat = [i for x in ids for i in (x if isinstance(x, (list, tuple)) else [x])]
        return sum(1 for i in flat if int(i) == self.unk_id)

    def __repr__(self) -> str:
        return (f"TextTokenizer({self.source!r}, vocab={self.vocab_size}, eos={self.eos_id}, pad={self.pad_id}, "
                f"unk={self.unk_id}, byte_fallback={self.byte_fallback}, sha256={self.sha256[:12]}…)")


def load_text_tokenizer(path: str) -> TextTokenizer:
    return TextTokenizer.load(path)


def check_text_tokenizer(recorded: dict, tok: TextTokenizer, where: str = "the checkpoint") -> None:
    """Raise TextTokenizerError unless `tok` is the text model `recorded` (an `identity()`) describes: the same
    file (sha256), hence the same vocabulary and ids."""
    if not recorded:
        raise TextTokenizerError(f"{where} records no text tokenizer, but {tok.source} was given: it was not "
                                 f"trained with text conditioning (model.conditioning=class)")
    if recorded.get("sha256") == tok.sha256:
        return
    vocab = recorded.get("vocab_size")
    what = (f"a different vocabulary ({vocab} pieces there, {tok.vocab_size} in {tok.source})" if vocab != tok.vocab_size
            else f"the same vocabulary size ({vocab}) but different pieces or ids")
    raise TextTokenizerError(
        f"the text tokenizer {tok.source} (sha256 {tok.sha256[:16]}…) is not the one {where} was trained with "
        f"(sha256 {str(recorded.get('sha256'))[:16]}…): {what}, so the caption ids would mean other words. Use the "
        f"model {where} carries (or was trained with), not this one")


def check_text_config(text_cfg, tok: TextTokenizer) -> None:
    """Raise TextTokenizerError if `tok` does not fit `text_cfg` (a config.TextConfig): the embedding needs a row
    for every id the tokenizer produces."""
    if tok.vocab_size > text_cfg.vocab_size:
        raise TextTokenizerError(f"model.text.vocab_size={text_cfg.vocab_size} is smaller than the vocabulary of "
                                 f"{tok.source} ({tok.vocab_size} pieces): set model.text.vocab_size >= "
                                 f"{tok.vocab_size}")
