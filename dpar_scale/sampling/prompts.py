"""Prompts for text-conditioned sampling: read from the command line or a file, turned into model inputs.

A prompts file is either plain text (one prompt per line; blank lines are skipped) or JSON Lines with a "caption"
field per line (a captions.jsonl, e.g. the embedded data's, so evaluation can sample its own caption set). Prompts
longer than the model's model.text.max_length are truncated exactly as training truncated captions, and counted;
characters the text tokenizer cannot spell (they become its unk piece, as they would in training) are named.
"""
from __future__ import annotations

import json
from pathlib import Path

from dpar_scale.errors import DparError, MissingFileError


class PromptError(DparError, ValueError):
    """Prompts that cannot be sampled (none given, an unreadable file, a malformed line)."""


def read_prompts_file(path: str) -> list[str]:
    """Prompts of a text file (one per line) or a JSON Lines file of {"caption": ...} objects."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"prompts file {path!r} does not exist")
    lines = p.read_text(encoding="utf-8-sig").splitlines()
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptError(f"{path}:{number}: not valid JSON ({e.msg}); give one prompt per line, or JSON "
                                  f"Lines with a \"caption\" field") from None
            if not isinstance(record.get("caption"), str):
                raise PromptError(f"{path}:{number}: a JSON line needs a string \"caption\"")
            prompts.append(record["caption"])
        else:
            prompts.append(line.strip())
    if not prompts:
        raise PromptError(f"{path} holds no prompts")
    return prompts


def prompt_inputs(tokenizer, prompts: list[str], max_length: int):
    """(text for generate_*: (text_ids, text_lengths, eos_id), number of prompts truncated to max_length)."""
    from dpar_scale.data.loader import ragged_text

    ids, lengths, truncated, _ = ragged_text(tokenizer, prompts, max_length)
    return (ids, lengths, tokenizer.eos_id), truncated


def unspellable_characters(tokenizer, prompts: list[str]) -> dict[int, list[str]]:
    """{index: the characters of prompt `index` that the text tokenizer cannot spell}, for the prompts that hold
    any: the model reads each run of them as one unk piece, so a prompt may say less than its user wrote."""
    verdict: dict[str, bool] = {}  # character -> unspellable (a caption set repeats its characters)
    out = {}
    for i, prompt in enumerate(prompts):
        if not tokenizer.count_unknown(tokenizer.encode(prompt)):
            continue
        chars = []
        for c in dict.fromkeys(prompt):
            if c not in verdict:
                verdict[c] = not c.isspace() and tokenizer.count_unknown(tokenizer.encode(c)) > 0
            if verdict[c]:
                chars.append(c)
        out[i] = chars
    return out


def describe_unspellable(found: dict[int, list[str]], prompts: list[str], limit: int = 5) -> str:
    """One warning line for `unspellable_characters`' result ('' when it is empty)."""
    if not found:
        return ""
    shown = "; ".join(f"{prompts[i]!r}: {' '.join(map(repr, chars))}" for i, chars in list(found.items())[:limit])
    more = f" (and {len(found) - limit} more)" if len(found) > limit else ""
    return (f"{len(found)} prompt(s) hold characters the text tokenizer cannot spell (the model reads them as its "
            f"unk piece): {shown}{more}")
