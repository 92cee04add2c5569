"""The text tokenizer inside checkpoints and exports, so that sampling a text model needs nothing else.

A text model's checkpoint folder (and its export) holds `text_tokenizer.model` (the sentencepiece file's bytes,
exactly as trained with) and `text_tokenizer.json` (its `TextTokenizer.identity()`: sha256, vocabulary, ids).
Reading checks the file against the recorded sha256; a tokenizer given instead (a path at sampling, the config's on
resume) must be that same model (`check_text_tokenizer`), otherwise caption ids would mean other words.
"""
from __future__ import annotations

import json
from pathlib import Path

from dpar_scale.errors import MissingFileError

TEXT_MODEL_FILE = "text_tokenizer.model"
TEXT_IDENTITY_FILE = "text_tokenizer.json"


def write_text_tokenizer(folder: str | Path, tokenizer) -> None:
    """Writes the text model and its identity into a checkpoint or export folder (each file atomically)."""
    folder = Path(folder)
    tokenizer.save(str(folder / TEXT_MODEL_FILE))
    tmp = folder / (TEXT_IDENTITY_FILE + ".tmp")
    tmp.write_text(json.dumps(tokenizer.identity(), indent=2) + "\n")
    tmp.replace(folder / TEXT_IDENTITY_FILE)


def recorded_text_identity(folder: str | Path) -> dict:
    path = Path(folder) / TEXT_IDENTITY_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def read_text_tokenizer(folder: str | Path, override: str = ""):
    """The text tokenizer a text checkpoint / export carries (`folder`: the checkpoint folder, the export folder
    or its model.safetensors), checked against its recorded identity; `override`: a .model path to use instead,
    which must be the same model."""
    from dpar_scale.text import TextTokenizer, TextTokenizerError, check_text_tokenizer

    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    recorded = recorded_text_identity(folder)
    where = f"the checkpoint {folder}"
    if override:
        tok = TextTokenizer.load(override)
        if recorded:
            check_text_tokenizer(recorded, tok, where)
        return tok
    if not (folder / TEXT_MODEL_FILE).is_file() or not recorded:
        raise MissingFileError(f"{folder} is a text model but carries no {TEXT_MODEL_FILE} / {TEXT_IDENTITY_FILE} "
                               f"(written by an older version, or copied without them): give the text tokenizer it "
                               f"was trained with (--text-tokenizer PATH, model.text.tokenizer)")
    tok = TextTokenizer.load(str(folder / TEXT_MODEL_FILE))
    if tok.sha256 != recorded.get("sha256"):
        raise TextTokenizerError(f"{folder / TEXT_MODEL_FILE} does not match its recorded sha256 "
                                 f"({str(recorded.get('sha256'))[:16]}…): the file is damaged; restore it, or give the "
                                 f"original model with --text-tokenizer")
    return tok
