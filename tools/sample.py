#!/usr/bin/env python
"""Sample class- or text-conditional images from a GPT or DPAR checkpoint (or its export) and decode them.

    python tools/sample.py --checkpoint RUN/checkpoints/step-000300 --classes 0,1,2 --num-per-class 4 \
        --cfg-scale 2.0 --seed 0 --out DIR [--temperature 1.0] [--top-k 0] [--top-p 1.0] \
        [--threshold θ] [--max-patch-length P] [--patch-mode MODE] \
        [--tokenizer-path PATH] [--entropy-checkpoint PATH] [--no-cache] [--device cpu]
    python tools/sample.py --checkpoint TEXT_RUN/... --prompts "a red disc" "a blue square" --num-per-prompt 4 \
        --out DIR        (or --prompts-file FILE: one prompt per line, or captions.jsonl; [--text-tokenizer PATH])

Writes DIR/grid.png (one row per class or prompt, labelled in a left margin), DIR/codes.npy (int64 [images, H, W]),
DIR/labels.npy (int64 [images]; text models: the prompt index) and, text models, DIR/prompts.json; for DPAR,
DIR/patch_lengths.json (the patches chosen while generating). A text model's tokenizer is the one its checkpoint
carries (--text-tokenizer must be that same model); CFG's unconditional half is the empty caption.
Image i of the grid reads the random stream of sample i of the seed (see dpar_scale.sampling.streams).

Where the model, the tokenizer and DPAR's entropy model come from: dpar_scale.checkpoint.sampling_inputs (the
checkpoint's data manifests, or --tokenizer-path / --entropy-checkpoint). The patch rule is the DPAR checkpoint's
`model.patch`; --threshold / --max-patch-length / --patch-mode override it at inference time.
For 50,000 samples on many GPUs, see tools/sample_ddp.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dpar_scale.cli import entry_point, parser  # noqa: E402
from dpar_scale.sampling.options import (add_sampling_arguments, apply_config_defaults,  # noqa: E402
                                         check_sampling_arguments, patch_rule_overrides)


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    add_sampling_arguments(p, batch_size=64)
    p.add_argument("--classes", default="", help="comma-separated class indices, e.g. 0,1,2 (class models)")
    p.add_argument("--num-per-class", type=int, default=4)
    p.add_argument("--prompts", nargs="+", default=None, help="text models: the prompts, one grid row each")
    p.add_argument("--prompts-file", default="", help="text models: prompts, one per line (or captions.jsonl)")
    p.add_argument("--num-per-prompt", type=int, default=4)
    p.add_argument("--text-tokenizer", default="", help="text models: default: the one the checkpoint carries")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every code (reference)")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def parse_classes(text: str, num_classes: int) -> list[int]:
    from dpar_scale.checkpoint.sampling_inputs import SamplingInputError

    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise SamplingInputError(f"--classes {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not classes:
        raise SamplingInputError("--classes: give at least one class index")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise SamplingInputError(f"--classes: {bad} outside the model's classes 0..{num_classes - 1}")
    return classes


def save_grid(images, classes: list[int], per_class: int, names: list[str] | None, path: Path) -> None:
    """One row per class, the class index (and name) drawn with PIL's default font in a left margin."""
    save_labelled_grid(images, [f"{c}" + (f" {names[c]}" if names and c < len(names) else "") for c in classes],
                       per_class, path)


def save_labelled_grid(images, texts: list[str], per_row: int, path: Path, max_chars: int = 48) -> None:
    """One row per label (a class, or a prompt cut to `max_chars`), drawn in a left margin."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = images.shape[1:3]
    pad, per_class = 2, per_row
    font = ImageFont.load_default()
    # PIL's fallback bitmap font draws Latin-1 only: other characters show as "?"
    texts = [(t if len(t) <= max_chars else t[:max_chars - 3] + "...").encode("latin-1", "replace").decode("latin-1")
             for t in texts]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(probe.textbbox((0, 0), t, font=font)[2] for t in texts)
    margin = text_w + 4 * pad
    canvas = Image.new("RGB", (margin + per_class * (w + pad) + pad, len(texts) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, text in enumerate(texts):
        top = pad + r * (h + pad)
        box = draw.textbbox((0, 0), text, font=font)
        draw.text((2 * pad, top + max(0, (h - (box[3] - box[1])) // 2)), text, fill="black", font=font)
        for c in range(per_class):
            canvas.paste(Image.fromarray(images[r * per_class + c]), (margin + pad + c * (w + pad), top))
    canvas.save(path)


def text_prompts(args) -> list[str]:
    from dpar_scale.sampling.prompts import PromptError, read_prompts_file

    if args.classes:
        raise PromptError(f"{args.checkpoint} is a text model: give --prompts or --prompts-file, not --classes")
    if bool(args.prompts) == bool(args.prompts_file):
        raise PromptError("a text model samples prompts: give --prompts \"…\" \"…\" or --prompts-file FILE (one "
                          "of them)")
    if args.num_per_prompt < 1:
        raise PromptError("--num-per-prompt must be >= 1")
    return list(args.prompts) if args.prompts else read_prompts_file(args.prompts_file)


@entry_point
def main(argv=None) -> int:
    return run(parse_args(argv))


def run(args) -> int:
    import numpy as np
    import torch

    from dpar_scale.checkpoint.sampling_inputs import SamplingInputError, describe_rule, load_sampling_inputs
    from dpar_scale.sampling.generate import GenerationStats, generate_dpar, generate_gpt
    from dpar_scale.sampling.images import decode_to_uint8
    from dpar_scale.sampling.prompts import describe_unspellable, prompt_inputs, unspellable_characters
    from dpar_scale.sampling.streams import sample_uniforms

    problem = check_sampling_arguments(args)
    if problem or args.num_per_class < 1:
        raise SamplingInputError(problem or "--num-per-class must be >= 1")
    inputs = load_sampling_inputs(args.checkpoint, device=args.device, tokenizer_path=args.tokenizer_path,
                                  tokenizer_name=args.tokenizer, entropy_checkpoint=args.entropy_checkpoint,
                                  patch_overrides=patch_rule_overrides(args),
                                  text_tokenizer_path=args.text_tokenizer)
    apply_config_defaults(args, inputs.cfg)
    model, kind, patch_cfg = inputs.model, inputs.kind, inputs.patch_cfg
    prompts = None
    if inputs.text_tokenizer is not None:
        prompts = text_prompts(args)
        classes, per_row = list(range(len(prompts))), args.num_per_prompt
        unspellable = unspellable_characters(inputs.text_tokenizer, prompts)
        if unspellable:
            print(describe_unspellable(unspellable, prompts), flush=True)
    else:
        if args.prompts or args.prompts_file:
            raise SamplingInputError(f"{args.checkpoint} is class-conditional: use --classes, not --prompts")
        if not args.classes:
            raise SamplingInputError("--classes: give the class indices to sample, e.g. --classes 0,1,2")
        classes, per_row = parse_classes(args.classes, model.num_classes), args.num_per_class
    if inputs.entropy_model is not None:
        print(f"entropy model: {inputs.sources['entropy_checkpoint']}; entropies rounded to "
              f"{str(inputs.entropy_dtype).split('.')[-1]}")
    if kind == "dpar":
        print(f"patch rule: {describe_rule(patch_cfg)} (trained: {inputs.sources['trained_patch_rule']})")

    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(per_row)
    truncated = 0
    h, w = model.grid
    draw = dict(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                use_cache=not args.no_cache, progress=True)
    all_codes, all_lengths, stats = [], [], []
    started = time.perf_counter()
    for lo in range(0, len(labels), args.batch_size):
        batch = labels[lo:lo + args.batch_size]
        uniforms = sample_uniforms(args.seed, range(lo, lo + len(batch)), h * w)
        st = GenerationStats()
        if prompts is not None:  # labels are prompt indices here; the model reads the prompts' tokens
            draw["text"], cut = prompt_inputs(inputs.text_tokenizer, [prompts[i] for i in batch.tolist()],
                                              inputs.cfg.model.text.max_length)
            truncated += cut
            batch = torch.zeros_like(batch)
        if kind == "dpar":
            codes, lengths = generate_dpar(model, inputs.entropy_model, batch, patch_cfg=patch_cfg,
                                           uniforms=uniforms, entropy_dtype=inputs.entropy_dtype, stats=st, **draw)
            all_lengths += lengths
        else:
            codes = generate_gpt(model, batch, uniforms=uniforms, stats=st, **draw)
        all_codes.append(codes.cpu())
        stats.append(st)
    seconds = time.perf_counter() - started
    codes = torch.cat(all_codes).view(-1, h, w)

    images = np.concatenate([decode_to_uint8(inputs.tokenizer, codes[lo:lo + args.batch_size].to(args.device))
                             for lo in range(0, len(codes), args.batch_size)])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "codes.npy", codes.numpy().astype(np.int64))
    np.save(out / "labels.npy", labels.numpy().astype(np.int64))
    if prompts is not None:
        (out / "prompts.json").write_text(json.dumps({"prompts": prompts, "num_per_prompt": per_row,
                                                      "truncated_prompts": truncated // per_row,
                                                      "unspellable_characters": {
                                                          str(i): c for i, c in unspellable.items()},
                                                      "text_tokenizer": inputs.text_tokenizer.identity()},
                                                     indent=1, ensure_ascii=False))
        save_labelled_grid(images, prompts, per_row, out / "grid.png")
        if truncated:
            print(f"{truncated // per_row} prompt(s) longer than model.text.max_length="
                  f"{inputs.cfg.model.text.max_length} tokens were truncated as in training")
    else:
        names = (inputs.manifest or {}).get("classes")
        save_grid(images, classes, per_row, names if isinstance(names, list) else None, out / "grid.png")
    print(f"{len(codes)} images ({kind}, {h}x{w} codes, cfg {args.cfg_scale:g}, "
          f"{'uncached' if args.no_cache else 'KV-cached'}) in {seconds:.1f}s "
          f"({seconds / len(codes):.3f} s/image) -> {out / 'grid.png'}")
    if kind == "dpar":
        n_patches = sum(len(x) for x in all_lengths)
        mean = h * w * len(all_lengths) / n_patches
        (out / "patch_lengths.json").write_text(json.dumps({
            "patch_lengths": all_lengths, "mean_patch_length": mean,
            "patch_rule": dataclasses.asdict(patch_cfg),
            "global_positions": sum(s.global_positions for s in stats)}))
        print(f"mean patch length {mean:.3f} ({n_patches / len(all_lengths):.1f} patches per image, "
              f"{h * w} codes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
