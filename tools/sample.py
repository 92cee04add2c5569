#!/usr/bin/env python
"""Sample class-conditional images from a GPT or DPAR checkpoint (or its export) and decode them with the tokenizer.

    python tools/sample.py --checkpoint RUN/checkpoints/step-000300 --classes 0,1,2 --num-per-class 4 \
        --cfg-scale 2.0 --seed 0 --out DIR [--temperature 1.0] [--top-k 0] [--top-p 1.0] \
        [--tokenizer-path PATH] [--entropy-checkpoint PATH] [--no-cache] [--device cpu]

Writes DIR/grid.png (one row per class, labelled in a left margin), DIR/codes.npy (int64 [images, H, W]),
DIR/labels.npy (int64 [images]) and, for DPAR, DIR/patch_lengths.json (the patches chosen while generating).

Where things come from:
* the model and its config: `load_model_for_inference(--checkpoint)`: a training checkpoint folder (sharded DCP or
  DeepSpeed; EMA weights when it has them) or what tools/export.py wrote (model.safetensors + config.json);
* the tokenizer: --tokenizer-path, else the one recorded in `<data.codes_dir>/manifest.json` (its name too; with
  only a path and no manifest the name is --tokenizer, or guessed from the suffix: .safetensors = kmeans,
  .pt/.pth = llamagen-vq16);
* DPAR's entropy model: --entropy-checkpoint, else `entropy_checkpoint` in the entropy manifest
  (`<data.entropy_dir or data.codes_dir/entropy>/manifest.json`, written by tools/compute_entropy.py). The patch
  rule and θ are the DPAR checkpoint's `model.patch`. Entropies are rounded to the dtype the manifest says
  training read them in (float16), so the boundaries follow training's rule exactly; mode=static needs none.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dpar_scale.checkpoint.save_load import CheckpointError  # noqa: E402
from dpar_scale.checkpoint.export import load_model_for_inference  # noqa: E402
from dpar_scale.sampling.generate import GenerationStats, generate_dpar, generate_gpt  # noqa: E402

SUFFIX_TOKENIZER = {".safetensors": "kmeans", ".pt": "llamagen-vq16", ".pth": "llamagen-vq16"}


class SampleError(Exception):
    """A problem with the inputs, reported as one clear line."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder of a gpt or dpar run, or an export (folder or its model.safetensors)")
    p.add_argument("--classes", required=True, help="comma-separated class indices, e.g. 0,1,2")
    p.add_argument("--num-per-class", type=int, default=4)
    p.add_argument("--cfg-scale", type=float, default=2.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--temperature", type=float, default=1.0, help="<= 0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--tokenizer-path", default="", help="default: the codes manifest's tokenizer")
    p.add_argument("--tokenizer", default="", help="tokenizer name when it cannot be read from the manifest")
    p.add_argument("--entropy-checkpoint", default="", help="DPAR: default: the entropy manifest's checkpoint")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every code (reference)")
    p.add_argument("--batch-size", type=int, default=64, help="images generated together")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def parse_classes(text: str, num_classes: int) -> list[int]:
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise SampleError(f"--classes {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not classes:
        raise SampleError("--classes: give at least one class index")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise SampleError(f"--classes: {bad} outside the model's classes 0..{num_classes - 1}")
    return classes


def resolve_dir(path: str) -> Path | None:
    """A config path as the run saw it: absolute, or relative to the working directory or the repository."""
    if not path:
        return None
    for candidate in (Path(path), ROOT / path):
        if candidate.is_dir():
            return candidate.resolve()
    return Path(path)


def read_json(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text())


def resolve_tokenizer(args, manifest: dict | None, manifest_path: Path | None) -> tuple[str, str]:
    recorded = (manifest or {}).get("tokenizer") or {}
    path = args.tokenizer_path or recorded.get("path", "")
    if not path:
        where = f"{manifest_path} has no tokenizer" if manifest else \
            f"no codes manifest at {manifest_path or '(data.codes_dir is empty)'}"
        raise SampleError(f"no tokenizer to decode with: {where}; pass --tokenizer-path PATH")
    name = args.tokenizer or recorded.get("name") or SUFFIX_TOKENIZER.get(Path(path).suffix, "")
    if not name:
        raise SampleError(f"cannot tell which tokenizer {path!r} is; pass --tokenizer kmeans|llamagen-vq16")
    return name, path


def resolve_entropy(args, cfg, codes_dir: Path | None) -> tuple[str, torch.dtype, str]:
    """(entropy checkpoint, dtype training read the entropies in, where it came from)."""
    entropy_dir = resolve_dir(cfg.data.entropy_dir) if cfg.data.entropy_dir else (
        codes_dir / "entropy" if codes_dir else None)
    manifest_path = entropy_dir / "manifest.json" if entropy_dir else None
    manifest = read_json(manifest_path)
    dtype = getattr(torch, (manifest or {}).get("dtype", "float32"), torch.float32)
    if args.entropy_checkpoint:
        return args.entropy_checkpoint, dtype, "--entropy-checkpoint"
    if manifest is None:
        raise SampleError(f"DPAR with patch mode {cfg.model.patch.mode!r} needs its entropy model: no entropy "
                          f"manifest at {manifest_path or '(data.codes_dir is empty)'}; pass --entropy-checkpoint")
    if not manifest.get("entropy_checkpoint"):
        raise SampleError(f"{manifest_path} records no entropy_checkpoint; pass --entropy-checkpoint")
    return manifest["entropy_checkpoint"], dtype, str(manifest_path)


def load_entropy_model(path: str, model, device: str):
    try:
        entropy_model, ecfg = load_model_for_inference(path, device=device)
    except (FileNotFoundError, CheckpointError) as e:
        raise SampleError(f"entropy model: {e}") from None
    if getattr(entropy_model, "num_classes", 1) != 0:
        raise SampleError(f"{path} is a {ecfg.model.kind} checkpoint, not the unconditional entropy model")
    if tuple(entropy_model.grid) != tuple(model.grid) or entropy_model.vocab_size != model.vocab_size:
        raise SampleError(f"entropy model {path} (grid {entropy_model.grid}, vocab {entropy_model.vocab_size}) "
                          f"does not match the DPAR model (grid {model.grid}, vocab {model.vocab_size})")
    return entropy_model


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] [B, 3, H, W] -> uint8 [B, H, W, 3]."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, classes: list[int], per_class: int, names: list[str] | None, path: Path) -> None:
    """One row per class, the class index (and name) drawn with PIL's default font in a left margin."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = images.shape[1:3]
    pad = 2
    font = ImageFont.load_default()
    texts = [f"{c}" + (f" {names[c]}" if names and c < len(names) else "") for c in classes]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(probe.textbbox((0, 0), t, font=font)[2] for t in texts)
    margin = text_w + 4 * pad
    canvas = Image.new("RGB", (margin + per_class * (w + pad) + pad, len(classes) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, text in enumerate(texts):
        top = pad + r * (h + pad)
        box = draw.textbbox((0, 0), text, font=font)
        draw.text((2 * pad, top + max(0, (h - (box[3] - box[1])) // 2)), text, fill="black", font=font)
        for c in range(per_class):
            canvas.paste(Image.fromarray(images[r * per_class + c]), (margin + pad + c * (w + pad), top))
    canvas.save(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except SampleError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    if args.num_per_class < 1 or args.batch_size < 1:
        raise SampleError("--num-per-class and --batch-size must be >= 1")
    try:
        model, cfg = load_model_for_inference(args.checkpoint, device=args.device)
    except (FileNotFoundError, CheckpointError) as e:
        raise SampleError(str(e)) from None
    kind = cfg.model.kind
    if kind not in ("gpt", "dpar"):
        raise SampleError(f"{args.checkpoint} is a {kind!r} model; sample.py samples class-conditional gpt or "
                          f"dpar checkpoints")
    classes = parse_classes(args.classes, model.num_classes)
    codes_dir = resolve_dir(cfg.data.codes_dir)
    manifest_path = codes_dir / "manifest.json" if codes_dir else None
    manifest = read_json(manifest_path)

    # Everything that can fail is checked before the (long) generation starts.
    from dpar_scale.tokenizer import load_tokenizer

    tok_name, tok_path = resolve_tokenizer(args, manifest, manifest_path)
    try:
        tokenizer = load_tokenizer(tok_name, tok_path, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        raise SampleError(f"tokenizer: {e}") from None
    if getattr(tokenizer, "vocab_size", model.vocab_size) != model.vocab_size:
        raise SampleError(f"tokenizer {tok_path} has {tokenizer.vocab_size} codes, the model {model.vocab_size}")
    entropy_model, entropy_dtype = None, torch.float32
    patch_cfg = cfg.model.patch
    if kind == "dpar" and patch_cfg.mode != "static":
        path, entropy_dtype, source = resolve_entropy(args, cfg, codes_dir)
        entropy_model = load_entropy_model(path, model, args.device)
        print(f"entropy model: {path} (from {source}); entropies rounded to {str(entropy_dtype).split('.')[-1]}")
    if kind == "dpar":
        print(f"patch rule: mode={patch_cfg.mode} alignment={patch_cfg.alignment} θ={patch_cfg.threshold:g} "
              f"P_max={patch_cfg.max_patch_length}" + (f" static_length={patch_cfg.static_length}"
                                                       if patch_cfg.mode == "static" else ""))

    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(args.num_per_class)
    generator = torch.Generator().manual_seed(args.seed)
    draw = dict(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                generator=generator, use_cache=not args.no_cache, progress=True)
    all_codes, all_lengths, stats = [], [], []
    started = time.perf_counter()
    for lo in range(0, len(labels), args.batch_size):
        batch = labels[lo:lo + args.batch_size]
        st = GenerationStats()
        if kind == "dpar":
            codes, lengths = generate_dpar(model, entropy_model, batch, patch_cfg=patch_cfg,
                                           entropy_dtype=entropy_dtype, stats=st, **draw)
            all_lengths += lengths
        else:
            codes = generate_gpt(model, batch, stats=st, **draw)
        all_codes.append(codes.cpu())
        stats.append(st)
    seconds = time.perf_counter() - started
    h, w = model.grid
    codes = torch.cat(all_codes).view(-1, h, w)

    images = []
    with torch.no_grad():
        for lo in range(0, len(codes), args.batch_size):
            images.append(to_uint8(tokenizer.decode(codes[lo:lo + args.batch_size].to(args.device))))
    images = np.concatenate(images)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "codes.npy", codes.numpy().astype(np.int64))
    np.save(out / "labels.npy", labels.numpy().astype(np.int64))
    names = (manifest or {}).get("classes")
    save_grid(images, classes, args.num_per_class, names if isinstance(names, list) else None, out / "grid.png")
    print(f"{len(codes)} images ({kind}, {h}x{w} codes, cfg {args.cfg_scale:g}, "
          f"{'uncached' if args.no_cache else 'KV-cached'}) in {seconds:.1f}s "
          f"({seconds / len(codes):.3f} s/image) -> {out / 'grid.png'}")
    if kind == "dpar":
        n_patches = sum(len(x) for x in all_lengths)
        mean = h * w * len(all_lengths) / n_patches
        (out / "patch_lengths.json").write_text(json.dumps({
            "patch_lengths": all_lengths, "mean_patch_length": mean,
            "patch_rule": {"mode": patch_cfg.mode, "alignment": patch_cfg.alignment,
                           "threshold": patch_cfg.threshold, "max_patch_length": patch_cfg.max_patch_length,
                           "static_length": patch_cfg.static_length},
            "global_positions": sum(s.global_positions for s in stats)}))
        print(f"mean patch length {mean:.3f} ({n_patches / len(all_lengths):.1f} patches per image, "
              f"{h * w} codes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
