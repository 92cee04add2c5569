"""Generating a whole evaluation set (e.g. 50,000 images) on any number of processes, resumably, with output that
does not depend on the number of processes.

Why the bytes do not depend on the world size:
* sample i reads its own random stream, a function of (seed, i) (`streams.sample_uniforms`), and its label is a
  function of (seed, i, N) (`streams.sample_labels`);
* the samples are cut into fixed chunks [kB, (k+1)B), B = `batch_size` (the run's setting, never derived from the
  world size), and a chunk is always generated as one batch. Batch composition is what the floats of a batched
  forward depend on (DPAR's global model even runs only the rows whose patch closed), so with it fixed every
  float, and so every code and pixel, is the same whichever rank runs the chunk and however many ranks there are;
* ranks take the missing chunks round-robin; which rank writes a chunk changes nothing in it; rank 0 assembles
  samples.npz in sample order, with fixed zip timestamps.
(Same hardware type, torch build and thread count are assumed: those change floats too.)

Resume: a chunk file is the unit of work; it is written atomically and records the settings that determine its
bytes (`settings_record`). A restarted job, on the same or another world size, verifies the chunks it finds
(spread over the ranks), regenerates unreadable ones, and refuses chunks written with other settings
(`ChunkSettingsError` says which settings differ).

`sample_to_folder` is the entry point (tools/sample_ddp.py is its command line); it returns a `SamplingResult`
whose `iter_rank_images` hands each rank its share of the images (chunks k ≡ rank mod world), so feature
extraction can run in the same process group.

Text models sample a caption set (`inputs.prompts`, tools/sample_ddp.py --captions): sample i's "label" is the
index of its caption, drawn exactly as class labels are (balanced over the captions by default), and the record
names the captions' sha256 and the text tokenizer, so a resume with other captions is refused.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dpar_scale.parallel.process_group import (all_gather_object, barrier, broadcast_object, get_rank,
                                               get_world_size)
from dpar_scale.sampling.chunk_files import (CHUNK_DIR, ChunkSettingsError, atomic_write, chunk_path, read_chunk,
                                             settings_diff, write_chunk, write_npz)
from dpar_scale.sampling.generate import GenerationStats, generate_dpar, generate_gpt
from dpar_scale.sampling.images import RESIZE_METHOD, decode_to_uint8
from dpar_scale.sampling.streams import LABEL_MODES, sample_labels, sample_uniforms

__all__ = ["SampleSettings", "SamplingResult", "sample_to_folder", "settings_record", "weights_fingerprint",
           "ChunkSettingsError"]

SAMPLES_FILE, META_FILE, PNG_DIR = "samples.npz", "meta.json", "png"
FORMAT_VERSION = 1


@dataclass
class SampleSettings:
    """What a sampling run was asked for; with the weights, everything that determines its bytes."""

    num_samples: int
    seed: int = 0
    cfg_scale: float = 2.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    batch_size: int = 32  # samples per chunk, generated together as one batch
    labels: str = "balanced"  # balanced | per-class | random (see streams.sample_labels)
    resize: int = 0  # > 0: bicubic resize to resize x resize before uint8 (images.decode_to_uint8)
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | bf16 | fp32

    def check(self) -> None:
        if self.num_samples < 1 or self.batch_size < 1:
            raise ValueError("num_samples and batch_size must be >= 1")
        if self.labels not in LABEL_MODES:
            raise ValueError(f"labels: {self.labels!r} is not one of {', '.join(LABEL_MODES)}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision: {self.precision!r} is not one of auto, bf16, fp32")
        if self.resize < 0:
            raise ValueError(f"resize must be >= 0 (0 = off), got {self.resize}")

    def resolved_precision(self, device: torch.device) -> str:
        if self.precision == "auto":
            return "bf16" if device.type == "cuda" else "fp32"
        return self.precision


@dataclass
class SamplingResult:
    out_dir: Path
    samples_path: Path
    meta: dict
    num_chunks: int
    batch_size: int
    rank: int = 0
    world_size: int = 1
    rank_chunks: list[int] = field(default_factory=list)  # this rank's share for evaluation: k ≡ rank mod world

    def iter_rank_images(self):
        """Yields (sample indices int64 [b], labels int64 [b], images uint8 [b, H, W, 3]) for this rank's chunks,
        read from the chunk files (so resumed chunks are included), chunk by chunk."""
        for k in self.rank_chunks:
            with np.load(chunk_path(self.out_dir, k), allow_pickle=False) as f:
                first = int(f["first"])
                yield np.arange(first, first + len(f["labels"])), f["labels"], f["images"]


def weights_fingerprint(module: torch.nn.Module | None) -> str | None:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes): the weights' identity, wherever they
    were loaded from."""
    if module is None:
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def settings_record(inputs, settings: SampleSettings, device: torch.device) -> dict:
    """The JSON-able record of everything that determines the bytes of the samples (compared on resume)."""
    model = inputs.model
    record = {"format_version": FORMAT_VERSION, **asdict(settings),
              "precision": settings.resolved_precision(device), "device_type": device.type,
              "kind": inputs.kind, "grid": list(model.grid), "vocab_size": model.vocab_size,
              "num_classes": model.num_classes, "model_sha256": weights_fingerprint(model),
              "tokenizer": {"name": inputs.tokenizer_name, "sha256": weights_fingerprint(inputs.tokenizer)}}
    if inputs.text_tokenizer is not None:
        record["captions"] = {"count": len(inputs.prompts), "sha256": hashlib.sha256(
            json.dumps(list(inputs.prompts), ensure_ascii=False).encode()).hexdigest()}
        record["text_tokenizer_sha256"] = inputs.text_tokenizer.sha256
    if inputs.kind == "dpar":
        record["patch_rule"] = asdict(inputs.patch_cfg)
        record["entropy_model_sha256"] = weights_fingerprint(inputs.entropy_model)
        record["entropy_dtype"] = str(inputs.entropy_dtype).split(".")[-1]
    return record


def _on_rank0(fn):
    """fn() on rank 0, its result (or its error) on every rank, so a failure there cannot leave the others
    waiting in a collective."""
    result, error = None, None
    if get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # re-raised on every rank below
            error = e
    error, result = broadcast_object((error, result))
    if error is not None:
        raise error
    return result


def _agree(local_fn):
    """local_fn() on every rank; the list of results in rank order on every rank, or the first error."""
    try:
        local = (None, local_fn())
    except Exception as e:
        local = (e, None)
    gathered = all_gather_object(local)
    for error, _ in gathered:
        if error is not None:
            raise error
    return [r for _, r in gathered]


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _generate_chunk(inputs, settings: SampleSettings, device, precision: str, ids: range,
                    labels: np.ndarray) -> dict:
    model, kind = inputs.model, inputs.kind
    h, w = model.grid
    uniforms = sample_uniforms(settings.seed, ids, h * w)
    batch = torch.from_numpy(labels).to(device)
    draw = dict(uniforms=uniforms, cfg_scale=settings.cfg_scale, temperature=settings.temperature,
                top_k=settings.top_k, top_p=settings.top_p)
    stats = GenerationStats()
    out = {"first": np.int64(ids.start), "labels": labels}
    if inputs.text_tokenizer is not None:  # labels are caption indices; the model reads the captions' tokens
        from dpar_scale.sampling.prompts import prompt_inputs

        draw["text"], _ = prompt_inputs(inputs.text_tokenizer, [inputs.prompts[i] for i in labels.tolist()],
                                        inputs.cfg.model.text.max_length)
        batch = torch.zeros_like(batch)
    with _autocast(device, precision):
        if kind == "dpar":
            codes, lengths = generate_dpar(model, inputs.entropy_model, batch, patch_cfg=inputs.patch_cfg,
                                           entropy_dtype=inputs.entropy_dtype, stats=stats, **draw)
            out["num_patches"] = np.array([len(x) for x in lengths], dtype=np.int64)
            out["global_positions"] = np.int64(stats.global_positions)
        else:
            codes = generate_gpt(model, batch, stats=stats, **draw)
    out["images"] = decode_to_uint8(inputs.tokenizer, codes.view(-1, h, w), settings.resize)
    out["codes"] = codes.cpu().numpy().astype(np.int64)
    return out


def _write_pngs(out_dir: Path, chunks: list[int]) -> None:
    from PIL import Image

    folder = out_dir / PNG_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for k in chunks:
        with np.load(chunk_path(out_dir, k), allow_pickle=False) as f:
            first, images = int(f["first"]), f["images"]
        for j, image in enumerate(images):
            path = folder / f"{first + j:06d}.png"
            if not path.exists():
                atomic_write(path, lambda handle, im=image: Image.fromarray(im).save(handle, format="PNG"))


def _assemble(out_dir: Path, num_chunks: int, n: int, image_shape: tuple, labels: np.ndarray) -> dict:
    """samples.npz from the chunks in order (streamed); DPAR statistics summed over the chunks."""
    dpar = {"num_patches": 0, "global_positions": 0}

    def image_parts():
        for k in range(num_chunks):
            with np.load(chunk_path(out_dir, k), allow_pickle=False) as f:
                if "num_patches" in f.files:
                    dpar["num_patches"] += int(f["num_patches"].sum())
                    dpar["global_positions"] += int(f["global_positions"])
                yield f["images"]

    write_npz(out_dir / SAMPLES_FILE, {"arr_0": ((n, *image_shape), np.uint8, image_parts()), "labels": labels})
    return dpar


def sample_to_folder(inputs, settings: SampleSettings, out_dir: str | Path, *, device: str | torch.device = "cpu",
                     png: bool = False, progress: bool = True) -> SamplingResult:
    """Generates (or resumes) `settings.num_samples` images into `out_dir` (chunks/, samples.npz, meta.json,
    png/ when `png`) on every rank of the current process group (or alone without one); returns on every rank.

    `inputs` is a `dpar_scale.checkpoint.sampling_inputs.SamplingInputs` (model, tokenizer, entropy model, patch
    rule, where they came from)."""
    settings.check()
    started = time.perf_counter()
    device = torch.device(device)
    rank, world = get_rank(), get_world_size()
    out_dir = Path(out_dir)
    model = inputs.model
    h, w = model.grid
    n, bsz = settings.num_samples, settings.batch_size
    num_chunks = -(-n // bsz)
    if inputs.text_tokenizer is not None and not inputs.prompts:
        raise ValueError("a text model samples a caption set: set inputs.prompts (tools/sample_ddp.py --captions)")
    classes = len(inputs.prompts) if inputs.text_tokenizer is not None else model.num_classes
    labels = sample_labels(settings.seed, n, classes, settings.labels)
    precision = settings.resolved_precision(device)
    record = _on_rank0(lambda: settings_record(inputs, settings, device))
    meta_path = out_dir / META_FILE

    def check_previous():
        out_dir.joinpath(CHUNK_DIR).mkdir(parents=True, exist_ok=True)
        for stale in out_dir.joinpath(CHUNK_DIR).glob(".chunk-*.tmp-*"):  # writes a kill interrupted
            stale.unlink()
        if meta_path.is_file():
            previous = json.loads(meta_path.read_text()).get("settings")
            if previous != record:
                raise ChunkSettingsError(
                    f"{out_dir} already holds samples made with other settings ({settings_diff(previous, record)}): "
                    f"sample into another --out, or delete {out_dir} to start over")
            return (out_dir / SAMPLES_FILE).is_file()
        return False

    finished = _on_rank0(check_previous)

    shape = (settings.resize, settings.resize, 3) if settings.resize else (
        h * inputs.tokenizer.downsample, w * inputs.tokenizer.downsample, 3)

    def verify_mine():
        complete = []
        for k in range(rank, num_chunks, world):
            path = chunk_path(out_dir, k)
            if not path.is_file():
                continue
            ids = range(k * bsz, min((k + 1) * bsz, n))
            if read_chunk(path, settings=record, first=ids.start, labels=labels[ids.start:ids.stop],
                          image_shape=shape, num_codes=h * w, dpar=inputs.kind == "dpar") is not None:
                complete.append(k)
            else:
                print(f"[rank {rank}] {path.name} is incomplete or unreadable: generating it again", flush=True)
                path.unlink()
        return complete

    complete = sorted(k for part in _agree(verify_mine) for k in part)
    missing = [k for k in range(num_chunks) if k not in set(complete)]
    if finished and not missing:  # nothing to generate; only PNGs asked for now may be missing
        if png:
            _agree(lambda: _write_pngs(out_dir, list(range(rank, num_chunks, world))))
        meta = json.loads(meta_path.read_text())
        return SamplingResult(out_dir, out_dir / SAMPLES_FILE, meta, num_chunks, bsz, rank, world,
                              list(range(rank, num_chunks, world)))
    mine = missing[rank::world]
    images_mine = sum(min((k + 1) * bsz, n) - k * bsz for k in mine)
    gen_started = time.perf_counter()
    bar = tqdm(total=images_mine, unit="img", desc=f"rank 0/{world}" if world > 1 else "sampling",
               disable=not progress or rank != 0, dynamic_ncols=True)
    with bar:
        for k in mine:
            ids = range(k * bsz, min((k + 1) * bsz, n))
            arrays = _generate_chunk(inputs, settings, device, precision, ids, labels[ids.start:ids.stop])
            write_chunk(chunk_path(out_dir, k), arrays, record)
            bar.update(len(ids))
            rate = bar.format_dict["n"] / max(bar.format_dict["elapsed"], 1e-9)
            bar.set_postfix_str(f"≈{rate * world:.1f} img/s over {world} ranks" if world > 1 else "")
    gen_seconds = time.perf_counter() - gen_started
    per_rank = _agree(lambda: {"images": images_mine, "seconds": gen_seconds})
    if png:
        _agree(lambda: _write_pngs(out_dir, list(range(rank, num_chunks, world))))

    def finish():
        dpar = _assemble(out_dir, num_chunks, n, shape, labels)
        generated = sum(r["images"] for r in per_rank)
        wall = max(r["seconds"] for r in per_rank)
        meta = {"samples": SAMPLES_FILE, "num_samples": n, "image_shape": list(shape), "settings": record,
                "sources": dict(inputs.sources), "world_size": world, "num_chunks": num_chunks,
                "chunks_resumed": len(complete), "images_generated": generated,
                "generation_seconds": wall, "seconds": time.perf_counter() - started,
                "images_per_second": generated / wall if wall > 0 else None,
                "labels": {"mode": settings.labels, "per_class_min": int(np.bincount(labels).min()),
                           "per_class_max": int(np.bincount(labels).max())},
                "resize": {"size": settings.resize, "method": RESIZE_METHOD} if settings.resize else None,
                "png": str(out_dir / PNG_DIR) if png else None,
                "torch": torch.__version__, "device": torch.cuda.get_device_name(device)
                if device.type == "cuda" else device.type}
        if inputs.kind == "dpar":
            halves = 2 if settings.cfg_scale != 1.0 else 1
            patches = dpar["num_patches"] / n
            meta["dpar"] = {"patch_rule": record["patch_rule"], "trained_patch_rule":
                            inputs.sources.get("trained_patch_rule"), "mean_patch_length": h * w / patches,
                            "mean_patches_per_image": patches,
                            # what the cached sampler ran per image and CFG half: class + all patches but the last
                            "global_positions_per_image": dpar["global_positions"] / (n * halves),
                            # what a training forward over the same layout runs: class + every patch
                            "global_positions_per_image_training_layout": patches + 1}
        atomic_write(meta_path, lambda handle: handle.write((json.dumps(meta, indent=2) + "\n").encode()))
        return meta

    meta = _on_rank0(finish)
    barrier()
    return SamplingResult(out_dir, out_dir / SAMPLES_FILE, meta, num_chunks, bsz, rank, world,
                          list(range(rank, num_chunks, world)))
