"""Caption shards: each code row's captions, stored as text beside the codes with the same sharding.

Why text, not token ids: the codes and their captions then do not depend on a text tokenizer, so one extraction
serves every text vocabulary (train a tokenizer after extracting, try another, use T5's), and changing captions
never re-encodes an image. The price is reading and tokenizing at load time: tools/bench_captions.py measured
~20 us per caption (5 ms for a batch of 256 captions of ~29 tokens, against 0.7 ms for its codes) on one CPU core.

Layout (`<codes>/captions/`, written by tools/extract_codes.py --captions FILE; atomic like the code shards):
    shard_00000.caption_rows.npy     int64 [n, 2]: per code row (first caption, number of captions), the caption
                                     index local to the shard; the views of one image share one range
    shard_00000.caption_offsets.npy  int64 [C + 1]: caption c is bytes [offsets[c], offsets[c + 1])
    shard_00000.caption_bytes.npy    uint8 [B]: the captions' UTF-8, concatenated
    shard_00000.captions.json        the shard's record (counts, sha256 of each file, what it was made from)
    manifest.json                    written last: totals, the uncaptioned images, empty / unmatched caption
                                     lines, and the code fingerprint it belongs to
Images without a caption keep their code rows, with zero captions: they train on the empty caption (the input
classifier-free guidance trains anyway), and dropping them would make the code rows depend on the caption file.
They are counted and listed in the manifest.
"""
from __future__ import annotations

import os

import numpy as np

from dpar_scale.data.captions import MatchedCaptions
from dpar_scale.data.shards import (
    FORMAT_VERSION, CodeShards, RowArray, ShardError, _load_manifest, _read_json, check_npy, save_npy_atomic,
    sha256_file, shard_stem, side_fingerprint, write_json_atomic, write_manifest,
)

__all__ = ["CAPTION_FORMAT", "CAPTIONS_SUBDIR", "caption_shard_files", "write_caption_shard",
           "read_caption_shard_record", "caption_shard_complete", "write_caption_manifest", "CaptionShards"]

CAPTION_FORMAT = "dpar-caption-shards"
CAPTIONS_SUBDIR = "captions"
UNCAPTIONED_POLICY = "kept with zero captions: they train on the empty caption"


def caption_shard_files(index: int) -> dict[str, str]:
    s = shard_stem(index)
    return {"rows": f"{s}.caption_rows.npy", "offsets": f"{s}.caption_offsets.npy",
            "bytes": f"{s}.caption_bytes.npy", "record": f"{s}.captions.json"}


def expected_shapes(record: dict) -> dict[str, tuple[tuple[int, ...], type]]:
    return {"rows": ((record["count"], 2), np.int64), "offsets": ((record["num_captions"] + 1,), np.int64),
            "bytes": ((record["num_bytes"],), np.uint8)}


def write_caption_shard(captions_dir: str, index: int, row_images: np.ndarray, by_image: dict[int, list[str]],
                        meta: dict | None = None) -> dict:
    """Caption shard `index` for code rows whose source images are `row_images` [n] (consecutive rows of one
    image share its captions), then its record. Returns the record (with `uncaptioned`: image indices)."""
    os.makedirs(captions_dir, exist_ok=True)
    files = caption_shard_files(index)
    record_path = os.path.join(captions_dir, files["record"])
    if os.path.exists(record_path):
        os.remove(record_path)
    row_images = np.asarray(row_images, dtype=np.int64).reshape(-1)
    rows = np.zeros((len(row_images), 2), np.int64)
    encoded, offsets, uncaptioned = [], [0], []
    last = None
    for r, image in enumerate(row_images.tolist()):
        if image != last:  # a new image: its captions start here
            captions = by_image.get(image, [])
            first = len(encoded)
            for text in captions:
                encoded.append(text.encode("utf-8"))
                offsets.append(offsets[-1] + len(encoded[-1]))
            if not captions:
                uncaptioned.append(image)
            last = image
        rows[r] = (first, len(captions))
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    sha = {"rows": save_npy_atomic(os.path.join(captions_dir, files["rows"]), rows),
           "offsets": save_npy_atomic(os.path.join(captions_dir, files["offsets"]), np.asarray(offsets, np.int64)),
           "bytes": save_npy_atomic(os.path.join(captions_dir, files["bytes"]), data)}
    record = {**(meta or {}), "index": index, "count": len(rows), "num_captions": len(encoded),
              "num_bytes": int(data.size), "num_images": len(set(row_images.tolist())),
              "uncaptioned": uncaptioned, "files": {k: files[k] for k in sha}, "sha256": sha}
    write_json_atomic(record_path, record)
    return record


def read_caption_shard_record(captions_dir: str, index: int) -> dict | None:
    rec = _read_json(os.path.join(captions_dir, caption_shard_files(index)["record"]))
    return rec if isinstance(rec, dict) and rec.get("index") == index else None


def caption_shard_complete(captions_dir: str, index: int, made_from: dict) -> bool:
    """True if caption shard `index` exists, was made from `made_from` (the code shard and caption file it
    describes) and its files match their recorded size and sha256."""
    rec = read_caption_shard_record(captions_dir, index)
    if rec is None or rec.get("made_from") != made_from:
        return False
    for key, (shape, dtype) in expected_shapes(rec).items():
        path = os.path.join(captions_dir, rec["files"][key])
        try:
            check_npy(path, shape, dtype)
        except ShardError:
            return False
        if sha256_file(path) != rec["sha256"][key]:
            return False
    return True


def write_caption_manifest(captions_dir: str, codes: CodeShards, matched: MatchedCaptions, extra: dict,
                           image_names: list[str]) -> dict:
    """Collect every caption shard's record into `captions_dir/manifest.json` (written last). `image_names`:
    the listing's paths as the manifest shows them (relative to the images root)."""
    records, missing = [], []
    for s in codes.shards:
        rec = read_caption_shard_record(captions_dir, s["index"])
        if rec is None or rec["count"] != s["count"]:
            missing.append(shard_stem(s["index"]))
        else:
            records.append(rec)
    if missing:
        raise ShardError(f"{captions_dir}: {len(missing)} caption shard(s) missing or with the wrong row count "
                         f"(first: {missing[:5]}); re-run tools/extract_codes.py with --captions to finish them")
    uncaptioned = [image_names[i] for r in records for i in r["uncaptioned"]]
    stored = sum(r["num_captions"] for r in records)
    matched_total = sum(len(v) for v in matched.by_image.values())
    manifest = {
        "format": CAPTION_FORMAT, "format_version": FORMAT_VERSION, "name": "captions",
        "codes_dir": codes.folder, "codes_fingerprint": codes.fingerprint, "num_rows": len(codes),
        **extra,
        "num_caption_lines": matched.num_lines,
        "num_images": sum(r["num_images"] for r in records),
        "num_captioned_images": sum(r["num_images"] for r in records) - len(uncaptioned),
        "num_captions": stored,
        "max_captions_per_image": max((len(v) for v in matched.by_image.values()), default=0),
        "uncaptioned_policy": UNCAPTIONED_POLICY,
        "num_uncaptioned_images": len(uncaptioned), "uncaptioned": uncaptioned,
        "num_empty_captions": len(matched.empty), "empty_captions": matched.empty,
        "num_unmatched_captions": len(matched.unmatched), "unmatched_captions": matched.unmatched,
        # captions of images listed but not encoded (unreadable: the code manifest's "skipped")
        "num_captions_of_skipped_images": matched_total - stored,
        "shards": [{k: r[k] for k in ("index", "count", "num_captions", "num_bytes", "files", "sha256")}
                   for r in records],
    }
    write_manifest(captions_dir, manifest)
    return manifest


class CaptionShards:
    """Read-only captions of a code folder's rows: `counts(ids)`, `captions(row)`, `texts(ids, choice)`."""

    def __init__(self, captions_dir: str, codes: CodeShards | None = None, max_open: int = 256):
        self.folder = os.path.abspath(captions_dir)
        m = _load_manifest(self.folder, CAPTION_FORMAT, "caption shards")
        self.manifest, self.shards = m, m["shards"]
        if [s["index"] for s in self.shards] != list(range(len(self.shards))):
            raise ShardError(f"{self.folder}: manifest shards are not numbered 0..{len(self.shards) - 1} in order")

        def arr(key, counts, row_shape, dtype):
            return RowArray(self.folder, [s["files"][key] for s in self.shards], counts, row_shape, dtype,
                            [s["sha256"][key] for s in self.shards], max_open)

        self._rows = arr("rows", [s["count"] for s in self.shards], (2,), np.int64)
        self._offsets = arr("offsets", [s["num_captions"] + 1 for s in self.shards], (), np.int64)
        self._bytes = arr("bytes", [s["num_bytes"] for s in self.shards], (), np.uint8)
        if len(self._rows) != m["num_rows"]:
            raise ShardError(f"{self.folder}: shards hold {len(self._rows)} rows, manifest says {m['num_rows']}")
        if codes is not None and codes.fingerprint != m["codes_fingerprint"]:
            raise ShardError(f"{self.folder}: these captions belong to other code shards than {codes.folder} "
                             f"(fingerprint mismatch: the codes were re-extracted); re-run tools/extract_codes.py "
                             f"with the same arguments and --captions {m.get('captions_file', 'FILE')}")
        self.fingerprint = side_fingerprint(m)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def arrays(self) -> dict[str, RowArray]:
        return {"rows": self._rows, "offsets": self._offsets, "bytes": self._bytes}

    def _shard_of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._rows.offsets, ids, side="right") - 1

    def counts(self, ids) -> np.ndarray:
        """int64 [len(ids)]: how many captions each row has (0: uncaptioned)."""
        return self._rows[np.asarray(ids, dtype=np.int64)][:, 1]

    def _text(self, shard: int, caption: int) -> str:
        offsets, data = self._offsets._map(shard), self._bytes._map(shard)
        return data[int(offsets[caption]):int(offsets[caption + 1])].tobytes().decode("utf-8")

    def captions(self, row: int) -> list[str]:
        """Every caption of one row."""
        first, n = (int(x) for x in self._rows[int(row)])
        shard = int(self._shard_of(np.array([row]))[0])
        return [self._text(shard, first + j) for j in range(n)]

    def texts(self, ids, choice) -> list[str]:
        """Caption `choice[i]` of row `ids[i]` ("" where choice is -1: the row has none)."""
        ids, choice = np.asarray(ids, dtype=np.int64), np.asarray(choice, dtype=np.int64)
        first, shards = self._rows[ids][:, 0], self._shard_of(ids)
        return ["" if c < 0 else self._text(k, f + c) for f, k, c in zip(first.tolist(), shards.tolist(),
                                                                          choice.tolist())]

    def verify(self) -> list[str]:
        """Sizes and sha256 of every file (uncached; dpar_scale.data.checks also checks the values)."""
        return [p for a in self.arrays.values() for p in a.verify()]
