"""Caption files and the choice of one caption per sample.

A caption file is JSON lines, one caption per line: `{"path": "00_disc/00000.png", "caption": "a small red disc"}`.
`path` is relative to the images root (the folder given to tools/extract_codes.py --images; "/" separates folders
on every OS) or absolute; an image may have several lines (several captions). Blank lines are skipped. Leading and
trailing whitespace of a caption is dropped; a caption left empty is not stored but counted (and listed by file
and line), so an image whose only captions are empty counts as uncaptioned.

What goes wrong is an error naming the file and line (a line that is not a JSON object, a missing or non-string
"path" / "caption", bytes that are not UTF-8) or, for a path that matches no listed image, an error listing the
first such lines unless unmatched lines are allowed — then they are counted and listed instead (a caption file
for a bigger collection than the images extracted).

Caption choice: an image with k > 1 captions is trained on caption `caption_choice(seed, epoch, sample id) mod k`
— a splitmix64 hash of the three, as `class_drop_mask` decides label dropout — so which caption a sample shows is
a pure function of the global cursor (whose position gives the epoch): any parallel layout, and a run resumed on
another one, sees the same captions, and a new epoch draws again.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from dpar_scale.errors import DparError

__all__ = ["CaptionFileError", "CaptionLine", "MatchedCaptions", "read_caption_file", "read_caption_texts",
           "match_captions", "splitmix_unit", "caption_choice", "CAPTION_SALT"]

SHOW = 5  # lines quoted in an error about many lines
_MASK64 = (1 << 64) - 1
# added to the hash of (seed, epoch, sample) so caption choice is not correlated with label dropout, which
# hashes (seed, step, sample) the same way
CAPTION_SALT = 0x632BE59BD9B4E019


class CaptionFileError(DparError, ValueError):
    """A caption file that cannot be read as captions of the given images; the message names file and line."""


@dataclass(frozen=True)
class CaptionLine:
    where: str  # "file:line"
    path: str  # as written in the file
    caption: str  # stripped


def read_caption_file(path: str) -> list[CaptionLine]:
    """Every line of a caption file, validated (see the module docstring); empty captions are kept here."""
    if not os.path.isfile(path):
        raise CaptionFileError(f"caption file {path!r} does not exist (expected JSON lines: "
                               f'{{"path": "<image path relative to the images root>", "caption": "..."}})')
    out = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a byte-order mark is not JSON
            except UnicodeDecodeError as e:
                raise CaptionFileError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}); save the caption "
                                       f"file as UTF-8") from None
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as e:
                raise CaptionFileError(f"{where}: not valid JSON ({e}); each line must be one object like "
                                       f'{{"path": "cls/img.png", "caption": "..."}}') from None
            if not isinstance(item, dict):
                raise CaptionFileError(f"{where}: a JSON {type(item).__name__}, not an object with \"path\" and "
                                       f"\"caption\"")
            for key in ("path", "caption"):
                if not isinstance(item.get(key), str):
                    got = "missing" if key not in item else f"a {type(item[key]).__name__}"
                    raise CaptionFileError(f"{where}: \"{key}\" is {got}; it must be a string")
            if not item["path"].strip():
                raise CaptionFileError(f"{where}: \"path\" is empty")
            out.append(CaptionLine(where, item["path"], item["caption"].strip()))
    return out


def read_caption_texts(paths: list[str]) -> list[str]:
    """The non-empty captions of several caption files, in file and line order (to train a text tokenizer)."""
    return [line.caption for p in paths for line in read_caption_file(p) if line.caption]


@dataclass
class MatchedCaptions:
    """Captions per listed image (index in the sorted listing), and what was left out."""
    by_image: dict[int, list[str]] = field(default_factory=dict)
    empty: list[str] = field(default_factory=list)  # "file:line" of empty captions (not stored)
    unmatched: list[dict] = field(default_factory=list)  # {"line": "file:line", "path": ...}: no such image
    num_lines: int = 0

    def uncaptioned(self, num_images: int) -> list[int]:
        return [i for i in range(num_images) if not self.by_image.get(i)]


def _key(path: str) -> str:
    return os.path.normcase(os.path.normpath(path))


def match_captions(lines: list[CaptionLine], images_root: str, image_paths: list[str],
                   allow_unmatched: bool = False) -> MatchedCaptions:
    """Attach each caption to its image (`image_paths`: the sorted listing, absolute). Raises CaptionFileError for
    lines whose path names no listed image, unless `allow_unmatched` (then they are counted and listed)."""
    root = os.path.abspath(images_root)
    index = {_key(p): i for i, p in enumerate(image_paths)}
    out = MatchedCaptions(num_lines=len(lines))
    for line in lines:
        path = line.path if os.path.isabs(line.path) else os.path.join(root, *line.path.split("/"))
        i = index.get(_key(path))
        if i is None:
            out.unmatched.append({"line": line.where, "path": line.path})
        elif not line.caption:
            out.empty.append(line.where)
        else:
            out.by_image.setdefault(i, []).append(line.caption)
    if out.unmatched and not allow_unmatched:
        shown = "; ".join(f"{u['line']}: {u['path']!r}" for u in out.unmatched[:SHOW])
        example = os.path.relpath(image_paths[0], root).replace(os.sep, "/") if image_paths else "cls/img.png"
        raise CaptionFileError(
            f"{len(out.unmatched)} of {len(lines)} caption lines name no image under {root} ({shown}"
            f"{' …' if len(out.unmatched) > SHOW else ''}). Paths are relative to the images root (e.g. "
            f"{example!r}) or absolute; fix them, or pass --allow-unmatched-captions to count and list such lines "
            f"in the manifest instead")
    return out


def splitmix_unit(seed: int, counter, sample_ids, salt: int = 0) -> np.ndarray:
    """float64 [n] in [0, 1): splitmix64 of seed·φ + counter·c1 + sample·c2 + salt (mod 2^64), the top 53 bits.
    `counter` (a step, an epoch) is an int or one per sample. With salt 0 it is the hash class_drop_mask uses."""
    ids = np.asarray(sample_ids, dtype=np.int64).astype(np.uint64)
    counter = np.broadcast_to(np.asarray(counter, dtype=np.int64), ids.shape).astype(np.uint64)
    base = np.uint64((seed * 0x9E3779B97F4A7C15 + salt) & _MASK64)
    with np.errstate(over="ignore"):
        z = base + counter * np.uint64(0xBF58476D1CE4E5B9) + ids * np.uint64(0x94D049BB133111EB)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def caption_choice(seed: int, epochs, sample_ids, counts) -> np.ndarray:
    """int64 [n]: which of its `counts[i]` captions sample `sample_ids[i]` shows in epoch `epochs[i]` (-1 where it
    has none: the empty caption)."""
    counts = np.asarray(counts, dtype=np.int64)
    u = splitmix_unit(seed, epochs, sample_ids, CAPTION_SALT)
    return np.where(counts > 0, np.minimum((u * counts).astype(np.int64), counts - 1), -1)
