"""Training batches from extracted codes: a seeded global order, one cursor, and per-rank slices.

The order in which samples are seen is a pure function of (seed, epoch, position in epoch): epoch e's order is
`randperm(n_train)` drawn from a generator seeded with (seed, e). The only state is the *global cursor* — how
many samples have been consumed in total — so a run resumed on a different number of ranks (or with a
different per-rank batch) picks up at exactly the same sample.

A global batch of G samples at cursor c is positions [c, c + G); data-parallel rank r of D takes the r-th of D
equal contiguous slices, and tensor-parallel ranks of one group pass the same r, so they see the same data.

Captions (text conditioning): the caption a sample shows is chosen by (seed, epoch, sample id), the epoch being
its position // n_train (`GlobalOrder.epochs`), so captions are a function of the cursor too; the batch carries
them as ragged token ids (`text_ids` flat + `text_lengths`), truncated to the configured length and counted.
The tokenizer is handed in (`TextSource`), so this room does not import dpar_scale.text.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpar_scale.config import ConfigError
from dpar_scale.data.captions import caption_choice
from dpar_scale.data.shards import ShardError
from dpar_scale.errors import MissingFileError
from dpar_scale.patching.rule import patch_rule, starts_to_lengths


@dataclass
class Batch:
    codes: torch.Tensor  # long [B, N]
    labels: torch.Tensor  # long [B]
    sample_ids: torch.Tensor  # long [B]: row index in the code shards
    patch_lengths: list[list[int]] | None = None  # per image, for DPAR
    # text conditioning: every image's caption tokens (each ending with eos; the empty caption is [eos]), concatenated
    # in batch order — long [Σ text_lengths] — and their counts, long [B]
    text_ids: torch.Tensor | None = None
    text_lengths: torch.Tensor | None = None
    text_truncated: int = 0  # captions of this batch longer than model.text.max_length, cut to it
    text_unknown: int = 0  # unk ids in this batch's text (characters the text tokenizer cannot spell)
    captions: list[str] | None = None  # the caption chosen for each image ("": none, the empty caption)
    layout: Any = None  # DPAR: its PatchLayout, when built ahead with the batch (dpar_scale/train/batches.py)

    @property
    def num_codes(self) -> int:
        return self.codes.numel()

    @property
    def num_patches(self) -> int:
        return sum(len(p) for p in self.patch_lengths) if self.patch_lengths is not None else self.num_codes


class GlobalOrder:
    """Maps global positions (0, 1, 2, … across epochs) to sample ids of a split."""

    def __init__(self, sample_ids: np.ndarray, seed: int, shuffle: bool = True):
        if len(sample_ids) == 0:
            raise ConfigError("the training split is empty: extract more images or lower data.val_fraction")
        self.sample_ids = np.asarray(sample_ids, dtype=np.int64)
        self.seed = seed
        self.shuffle = shuffle
        # epoch -> permutation, a few recent ones: a dict (not one cached slot) so that batch-building worker
        # threads asking for different epochs at once never see each other's permutation
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.sample_ids)

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm = torch.randperm(len(self.sample_ids), generator=g).numpy()
            else:
                perm = np.arange(len(self.sample_ids))
            if len(self._perms) >= 4:
                self._perms.pop(min(self._perms), None)
            self._perms[epoch] = perm
        return perm

    def epochs(self, start: int, count: int) -> np.ndarray:
        """Epoch of each global position [start, start + count) (what caption choice hashes)."""
        return (start + np.arange(count, dtype=np.int64)) // len(self.sample_ids)

    def ids(self, start: int, count: int) -> np.ndarray:
        """Sample ids at global positions [start, start + count)."""
        n = len(self.sample_ids)
        positions = start + np.arange(count, dtype=np.int64)
        out = np.empty(count, dtype=np.int64)
        for epoch in range(start // n, (start + count - 1) // n + 1) if count else ():
            inside = (positions // n) == epoch
            out[inside] = self.sample_ids[self._permutation(epoch)[positions[inside] % n]]
        return out


def split_source_images(num_rows: int, copies_per_image: int, val_fraction: float) -> tuple[int, int]:
    """(training, validation) source images of a code set of `num_rows` rows, `copies_per_image` views each:
    round(images x val_fraction) images (at least one when val_fraction > 0 and there are two or more) are held
    out with all their views (which ones: `held_out_sources`)."""
    n_sources = num_rows // copies_per_image
    n_val = int(round(n_sources * val_fraction))
    if val_fraction > 0 and n_val == 0 and n_sources > 1:
        n_val = 1
    return n_sources - n_val, n_val


def held_out_sources(n_sources: int, n_val: int) -> np.ndarray:
    """The `n_val` validation images among `n_sources`: the middle image of each of n_val equal runs of the listing,
    in a fixed shuffled order. Listings are sorted by class folder: the last images would all be of the last class,
    whose loss would then stand for the whole set's while that class lost its share of training images. Shuffled
    so that the prefix the trainer validates on (train.val_batches) spans the listing too."""
    spread = (2 * np.arange(n_val, dtype=np.int64) + 1) * n_sources // (2 * n_val)
    return spread[np.random.default_rng(0).permutation(n_val)]


@dataclass
class DataSummary:
    """What a code folder's manifest says, read without opening a shard: launch-time checks of a config against
    its data and cost estimates (`CodeData` reads the same fields and the rows themselves)."""

    codes_dir: str
    grid: tuple[int, int]
    vocab_size: int
    num_classes: int
    num_rows: int
    copies_per_image: int
    image_size: int

    @classmethod
    def read(cls, codes_dir: str) -> "DataSummary":
        from dpar_scale.data.shards import load_code_manifest

        m = load_code_manifest(codes_dir)
        return cls(codes_dir=str(codes_dir), grid=tuple(int(g) for g in m["grid"]), vocab_size=int(m["vocab_size"]),
                   num_classes=int(m["num_classes"]), num_rows=int(m["num_images"]),
                   copies_per_image=int(m["augmentation"]["copies_per_image"]), image_size=int(m["image_size"]))

    def num_train_images(self, val_fraction: float) -> int:
        return split_source_images(self.num_rows, self.copies_per_image, val_fraction)[0]


class CodeData:
    """Codes, labels and (optionally) entropies of an extracted dataset, with a train/validation split.

    Rows that come from the same source image (ten-crop/flip copies) are kept in the same split.
    """

    def __init__(self, codes, labels, grid: tuple[int, int], vocab_size: int, num_classes: int,
                 entropy=None, copies_per_image: int = 1, val_fraction: float = 0.0, manifest: dict | None = None,
                 captions=None):
        self.codes, self.labels, self.entropy, self.captions = codes, labels, entropy, captions
        self.grid, self.vocab_size, self.num_classes = tuple(grid), vocab_size, num_classes
        self.manifest = manifest or {}
        # set by `open`: the exact data (CodeShards.fingerprint and the entropy side array's shard checksums)
        self.codes_dir, self.codes_fingerprint, self.entropy_dir, self.entropy_fingerprint = "", "", "", ""
        self.captions_dir, self.captions_fingerprint = "", ""
        n = len(labels)
        if n == 0:
            raise ShardError("the code dataset is empty: run tools/extract_codes.py on a folder with images first")
        if entropy is not None and len(entropy) != n:
            raise ShardError(f"entropy rows ({len(entropy)}) do not match code rows ({n}): recompute entropies")
        if captions is not None and len(captions) != n:
            raise ShardError(f"caption rows ({len(captions)}) do not match code rows ({n}): re-extract the captions")
        self.copies_per_image = copies_per_image
        self.num_train_images, n_val = split_source_images(n, copies_per_image, val_fraction)
        sources = held_out_sources(n // copies_per_image, n_val)
        self.val_ids = (sources[:, None] * copies_per_image + np.arange(copies_per_image)).reshape(-1)
        held_out = np.zeros(n, dtype=bool)
        held_out[self.val_ids] = True
        self.train_ids = np.flatnonzero(~held_out).astype(np.int64)  # rows past the last whole image train too

    @classmethod
    def open(cls, codes_dir: str, entropy_dir: str = "", need_entropy: bool = False, val_fraction: float = 0.0,
             verify: str = "full", share=None, allow_null_label: bool = False, captions_dir: str = "",
             need_captions: bool = False):
        """Opens and checks the data (dpar_scale.data.checks): every file's size, its sha256 (verify="full"; "size"
        skips the hash) and its values, split over the ranks of `share` (an integrity.WorkShare; every rank of it
        must call open) and cached per user. `allow_null_label`: labels may also be the null class num_classes.
        Captions (need_captions, or a captions_dir given): `captions_dir` or <codes_dir>/captions."""
        from dpar_scale.data.caption_shards import CAPTIONS_SUBDIR, CaptionShards
        from dpar_scale.data.checks import captions_command, check_caption_shards, check_code_shards, check_side_array
        from dpar_scale.data.shards import CodeShards, side_fingerprint
        from dpar_scale.data.side_arrays import open_side_array
        from dpar_scale.integrity import WorkShare

        share = share or WorkShare()
        shards = CodeShards(codes_dir)
        codes = _Rows(shards.codes)
        entropy = captions = None
        if need_entropy or entropy_dir:
            path = Path(entropy_dir or Path(codes_dir) / "entropy")
            if not (path / "manifest.json").is_file():
                raise MissingFileError(
                    f"no entropies at {path}: run tools/compute_entropy.py --codes {codes_dir} first "
                    f"(or set model.patch.mode=static, which needs none)")
            entropy = open_side_array(str(path), codes=shards)
        if need_captions or captions_dir:
            caption_path = Path(captions_dir or Path(codes_dir) / CAPTIONS_SUBDIR)
            if not (caption_path / "manifest.json").is_file():
                raise MissingFileError(
                    f"no captions at {caption_path}: run tools/extract_codes.py with the arguments that made "
                    f"{codes_dir} and --captions CAPTIONS.jsonl (it re-uses the code shards and adds the captions)")
            captions = CaptionShards(str(caption_path), codes=shards)
        check_code_shards(shards, verify, share, allow_null_label)
        if entropy is not None:
            check_side_array(entropy, shards.vocab_size, verify, share, codes_dir=shards.folder)
        if captions is not None:
            check_caption_shards(captions, verify, share, captions_command(shards, captions))
        data = cls(codes, shards.labels, grid=shards.grid, vocab_size=shards.vocab_size,
                   num_classes=shards.num_classes, entropy=entropy, copies_per_image=shards.copies_per_image,
                   val_fraction=val_fraction, manifest=shards.manifest, captions=captions)
        data.codes_dir, data.codes_fingerprint = shards.folder, shards.fingerprint
        if entropy is not None:
            data.entropy_dir, data.entropy_fingerprint = str(path.resolve()), side_fingerprint(entropy.manifest)
        if captions is not None:
            data.captions_dir, data.captions_fingerprint = captions.folder, captions.fingerprint
        return data

    def identity(self) -> dict:
        """Which exact data this is (folders and fingerprints); checkpoints record it to refuse a resume on other
        data. Empty fingerprints when the data was not opened from shards."""
        out = {"codes_dir": self.codes_dir, "codes_fingerprint": self.codes_fingerprint,
               "entropy_dir": self.entropy_dir, "entropy_fingerprint": self.entropy_fingerprint}
        if self.captions is not None:
            out.update(captions_dir=self.captions_dir, captions_fingerprint=self.captions_fingerprint)
        return out

    def gather(self, ids: np.ndarray, with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        codes = torch.from_numpy(_read_rows(self.codes, ids).astype(np.int64))
        labels = torch.from_numpy(_read_rows(self.labels, ids).astype(np.int64))
        return codes, labels, self.read_entropy(ids) if with_entropy else None

    def choose_captions(self, ids: np.ndarray, epochs, seed: int) -> list[str]:
        """The caption each sample shows in its epoch (`epochs`: one per id, or one for all); "" where a sample has
        none. A pure function of (seed, epoch, sample id): dpar_scale.data.captions.caption_choice."""
        if self.captions is None:
            raise ShardError("this data has no captions: open it with need_captions=True (caption shards from "
                             "tools/extract_codes.py --captions)")
        ids = np.asarray(ids, dtype=np.int64)
        return self.captions.texts(ids, caption_choice(seed, epochs, ids, self.captions.counts(ids)))

    def read_entropy(self, ids: np.ndarray) -> torch.Tensor | None:
        """float32 [len(ids), H·W] entropies of the given rows (None when the data has none)."""
        if self.entropy is None:
            return None
        return torch.from_numpy(_read_rows(self.entropy, ids).astype(np.float32))


def _read_rows(rows, ids: np.ndarray) -> np.ndarray:
    """rows[ids], read in sorted order (friendlier to memory-mapped shards) and returned in the order asked."""
    order = np.argsort(ids, kind="stable")
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return np.asarray(rows[ids[order]])[inverse]


class _Rows:
    """Adapts a row-reading function (e.g. `CodeShards.codes`) to `rows[index_array]`."""

    def __init__(self, read):
        self.read = read

    def __getitem__(self, idx):
        return self.read(idx)


@dataclass
class TextSource:
    """How a batch's captions become token ids. `tokenizer`: anything with `encode_captions(texts, max_length) ->
    (ids per text, truncated count)` and `count_unknown(ids)` (dpar_scale.text.TextTokenizer); `max_length`:
    model.text.max_length; `seed`: train.seed (caption choice)."""
    tokenizer: Any
    max_length: int
    seed: int


def ragged_text(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(text_ids long [Σ lengths], text_lengths long [len(texts)], truncated, unknown) of `texts` — a batch's
    captions, or prompts at sampling time ("" is the empty caption)."""
    ids, truncated = tokenizer.encode_captions(list(texts), max_length)
    flat = torch.tensor([i for x in ids for i in x], dtype=torch.long)
    return flat, torch.tensor([len(x) for x in ids], dtype=torch.long), truncated, tokenizer.count_unknown(ids)


class BatchSource:
    """Turns sample ids into `Batch`es, computing patch lengths with the configured rule when needed, and (with a
    `TextSource`) each sample's caption tokens."""

    def __init__(self, data: CodeData, patch_cfg=None, text: TextSource | None = None):
        self.data = data
        self.patch_cfg = patch_cfg  # PatchConfig for DPAR, None for token-level models
        if text is not None and data.captions is None:
            raise ConfigError("text conditioning needs captions beside the codes: open the data with captions "
                              "(tools/extract_codes.py --captions CAPTIONS.jsonl writes them)")
        self.text = text

    def make(self, ids: np.ndarray, patch_lengths: list[list[int]] | None = None, epochs=None) -> Batch:
        """`patch_lengths`: already computed for these ids (the packer did), so they are not derived again.
        `epochs`: with text, the epoch of each id (GlobalOrder.epochs of its positions; 0 for validation)."""
        codes, labels, entropy = self.data.gather(ids, with_entropy=patch_lengths is None)
        lengths = patch_lengths
        if lengths is None and self.patch_cfg is not None:
            lengths = self._lengths(entropy, codes.shape)
        batch = Batch(codes=codes, labels=labels, sample_ids=torch.from_numpy(ids), patch_lengths=lengths)
        if self.text is not None:
            if epochs is None:
                raise ValueError("a text batch needs the epoch of each sample (caption choice is per (seed, epoch, "
                                 "sample)): pass epochs=GlobalOrder.epochs(...) of their positions, or 0")
            batch.captions = self.data.choose_captions(ids, epochs, self.text.seed)
            batch.text_ids, batch.text_lengths, batch.text_truncated, batch.text_unknown = ragged_text(
                self.text.tokenizer, batch.captions, self.text.max_length)
        return batch

    def text_lengths(self, ids: np.ndarray, epochs) -> list[int]:
        """Each sample's caption length in tokens (truncated, eos included) in its epoch: what a text model's
        packer counts (the caption replaces the class position)."""
        texts = self.data.choose_captions(ids, epochs, self.text.seed)
        ids_per, _ = self.text.tokenizer.encode_captions(texts, self.text.max_length)
        return [len(x) for x in ids_per]

    def patch_lengths(self, ids: np.ndarray) -> list[list[int]]:
        """Patch lengths of the given samples, reading only their entropies (for the position-budget packer)."""
        n = self.data.grid[0] * self.data.grid[1]
        return self._lengths(self.data.read_entropy(ids), (len(ids), n))

    def _lengths(self, entropy: torch.Tensor | None, shape) -> list[list[int]]:
        p = self.patch_cfg
        if p.mode != "static" and entropy is None:
            raise ValueError("DPAR with an entropy patch rule needs entropies (data.entropy_dir)")
        source = entropy if entropy is not None else torch.zeros(shape)
        return starts_to_lengths(patch_rule(p, self.data.grid[1])(source))


def rank_slice(global_ids: np.ndarray, dp_rank: int, dp_size: int) -> np.ndarray:
    """The contiguous share of a global batch that data-parallel rank `dp_rank` reads."""
    if len(global_ids) % dp_size:
        raise ValueError(f"global batch of {len(global_ids)} does not split over {dp_size} data-parallel ranks")
    per = len(global_ids) // dp_size
    return global_ids[dp_rank * per:(dp_rank + 1) * per]


def rank_share(ids: np.ndarray, dp_rank: int, dp_size: int) -> tuple[np.ndarray, torch.Tensor]:
    """Rank `dp_rank`'s part of a batch that need not split evenly (validation): (ids, weight per id).

    Parts differ by at most one image; shorter parts are padded by repeating their first id (or the batch's
    first id when empty) with weight 0, so every rank runs the same number of forwards of non-empty batches (FSDP
    and TP need every rank in every collective) and the padding counts for nothing.
    """
    parts = np.array_split(np.asarray(ids), dp_size)
    want = max(len(p) for p in parts)
    mine = parts[dp_rank]
    pad = want - len(mine)
    filler = mine[:1] if len(mine) else np.asarray(ids)[:1]
    weight = torch.cat([torch.ones(len(mine)), torch.zeros(pad)])
    return np.concatenate([mine, np.repeat(filler, pad)]).astype(np.int64), weight
