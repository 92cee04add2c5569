#!/usr/bin/env python
"""Training FLOPs of DPAR against its LlamaGen baseline, counted on the real modules (fvcore and torch's
FlopCounterMode) and cross-checked against an analytic formula.

    python tools/count_flops.py --model dpar-xl --baseline gpt-xl --image-size 384 --mean-patch-length 2.06
    python tools/count_flops.py --model dpar-b --baseline gpt-b --image-size 256 \\
        --entropies runs/demo/data/codes/entropy --threshold 7.8 --max-patch-length 4 --json flops.json
    python tools/count_flops.py --all [--json grid.json]     # B/L/XL/XXL x 256/384 px at the paper's statistics
    python tools/count_flops.py ... --dpar first,true        # DPAR in the legacy structure (default every,false)
    python tools/count_flops.py ... --text-length 32         # text-to-image models: a 32-token caption prefix

Layout: `--mean-patch-length ℓ` builds a valid layout (codes 0 and 1 start patches, row resets, P_max) with
round(N/ℓ) patches per image spread evenly (FLOPs depend on a layout only through its patch counts); the default
ℓ is the paper's (1.81 at 256 px, 2.06 at 384 px). `--entropies PATH` (a folder from tools/compute_entropy.py, or
an .npy [n, H*W]) cuts real patches with the patch rule; `--batch-images` of them are counted op by op (each image
in a forward of its own, so no padding is counted) and all of them (up to --max-images) analytically, which gives
the data set's mean.

Conventions: FLOPs = 2 x multiply-adds (fvcore counts one per multiply-add: its counts are doubled); training =
3 x forward (backward = 2 x forward: each matmul's input and weight gradients); weight matmuls + attention's QKᵀ
and PV only; attention counts the (query, key) pairs of the real sequences (Σ L_i² of the packed sequence, not the
padded T², a patch query only its own codes), causal counted as the full L² (`--attention exact`: L(L+1)/2).
Big models are counted on a probe with one layer per stack and the real widths, scaled by depth (exact: see
dpar_scale/flops/analytic.py); `--full-depth` counts the whole model instead (needs its memory). The three counts must
agree within --tolerance (default 2%) or the tool exits with status 1.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpar_scale.cli import (  # noqa: E402
    UsageError, entry_point, existing_path, non_negative_int, parser, positive_float, positive_int,
)

if TYPE_CHECKING:  # torch and the counters load after the arguments are parsed
    import torch

    from dpar_scale.config import DPARConfig, ModelConfig

SIZES = ("b", "l", "xl", "xxl")
GROUP_COLUMNS = ("encoder", "global", "decoder", "head", "attention")


def conventions(attention: str, probe: bool) -> dict:
    from dpar_scale.flops.analytic import TRAIN_FACTOR

    return {
        "flops": "2 x multiply-adds (fvcore's counts, one per multiply-add, are doubled)",
        "train_factor": TRAIN_FACTOR,
        "train": "forward + backward; backward = 2 x forward (input and weight gradient of every matmul); "
                 "no activation recomputation",
        "counted": "weight matmuls (nn.Linear, head included) and attention QK^T + PV; elementwise ops, norms, "
                   "softmax, RoPE, pooling and embedding lookups are not",
        "attention": attention,
        "attention_rule": "pairs of the real sequences: packed Σ L_i² (not the padded T²), cross-attention Σ patch "
                          "lengths; causal as full L²" if attention == "full" else
                          "pairs the mask allows: causal L(L+1)/2, packed per image, cross-attention Σ patch lengths",
        "method": "probe: one layer per stack at full width, counts of layer 0 x depth (exact)" if probe
                  else "full-depth model",
    }


def model_config(name: str, grid: tuple[int, int], vocab: int, classes: int,
                 dpar: DPARConfig | None = None, text_vocab: int = 0) -> ModelConfig:
    """The preset's model; `text_vocab` > 0: its text-to-image version (model.conditioning=text)."""
    from dpar_scale.config import DPARConfig, ModelConfig, TextConfig
    from dpar_scale.models import PRESETS

    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    if PRESETS[name].get("conditioning") == "text" and not text_vocab:
        raise UsageError(f"{name} is a text model: give --text-length L (the caption tokens counted)")
    return ModelConfig(kind=PRESETS[name]["kind"], preset=name, grid=tuple(grid), vocab_size=vocab,
                       num_classes=classes, dpar=dpar or DPARConfig(),
                       conditioning="text" if text_vocab else "class", text=TextConfig(vocab_size=text_vocab))


def load_entropies(path: str, max_images: int, verify: str = "full",
                   ) -> tuple[torch.Tensor, tuple[int, int] | None, int | None]:
    """([n, H*W] float32 entropies, rows evenly spaced; the grid and vocabulary of their codes when known) from a
    tools/compute_entropy.py folder (checked like training checks it; grid and vocabulary from its manifests) or
    an .npy file (its values checked: finite and >= 0; it records no vocabulary to bound them by)."""
    import numpy as np
    import torch

    from dpar_scale.data.checks import check_entropy_values, open_checked_side_array

    p = Path(path)
    grid = vocab = None
    if p.is_dir():
        array = open_checked_side_array(str(p), verify)
        manifest = array.manifest
        codes_manifest = Path(manifest.get("codes_dir") or p.parent) / "manifest.json"
        codes = json.loads(codes_manifest.read_text()) if codes_manifest.exists() else {}
        grid = manifest.get("grid") or codes.get("grid")
        grid = tuple(int(x) for x in grid) if grid else None
        vocab = manifest.get("vocab_size", codes.get("vocab_size"))
    else:
        try:
            array = np.load(p, mmap_mode="r")
        except ValueError as e:
            raise UsageError(f"--entropies {path}: not a .npy array ({e})") from None
        if array.ndim != 2:
            raise UsageError(f"--entropies {path}: expected [n, H*W] entropies, got shape {list(array.shape)}")
        bad = check_entropy_values(np.asarray(array), None)
        if bad is not None:
            raise UsageError(f"--entropies {path}: row {bad[0]} holds entropy {float(array[bad])} at position "
                             f"{bad[1]}; entropies must be finite and >= 0 nats")
    rows = np.unique(np.linspace(0, len(array) - 1, num=min(len(array), max_images)).astype(np.int64))
    return torch.from_numpy(np.asarray(array[rows]).astype(np.float32)), grid, vocab


def describe(name: str, m) -> dict:
    from dpar_scale.models import PRESETS

    per_image = {k: b.groups() for k, b in m.counters().items()}
    return {
        "kind": PRESETS[name]["kind"], "params": m.params,
        "forward_flops_per_image": m.fvcore.forward_per_image(),
        "train_flops_per_image": m.fvcore.train_per_image(),
        "global_positions_per_image": m.global_positions_per_image,
        "mean_patch_length": m.mean_patch_length,
        "forward_flops_per_image_by_group": {k: per_image["fvcore"][k] for k in GROUP_COLUMNS},
        "forward_flops_per_image_by_counter": {k: g["total"] for k, g in per_image.items()},
        "max_disagreement": m.disagreement,
    }


def compare(args, model: str, baseline: str, image_size: int | None, grid: tuple[int, int],
            mean_length: float | None = None, entropies: torch.Tensor | None = None) -> tuple[dict, dict]:
    """Counts both models on one layout; returns (the JSON record, the Measurement of each model).
    `image_size` is None when the grid is not a VQ-16 grid of a known image size (then no paper defaults)."""
    import numpy as np

    from dpar_scale.flops.analytic import TRAIN_FACTOR, analytic_breakdown, lengths_with_mean
    from dpar_scale.flops.counting import measure
    from dpar_scale.models import PRESETS
    from dpar_scale.config import PatchConfig
    from dpar_scale.patching.rule import PAPER_MEAN_PATCH_LENGTH, PAPER_THRESHOLD, patch_kwargs, patch_lengths

    text_vocab = args.text_vocab if args.text_length else 0
    cfgs = {name: model_config(name, grid, args.vocab, args.classes, args.structure, text_vocab)
            for name in (baseline, model)}
    layout_info: dict = {"max_patch_length": args.max_patch_length}
    if args.text_length:
        layout_info["text_length"] = args.text_length
    dataset = None
    if entropies is not None:
        theta = args.threshold if args.threshold is not None else PAPER_THRESHOLD.get(image_size)
        if theta is None and args.mode != "static":
            raise UsageError(f"no paper threshold for a {grid[0]}x{grid[1]} grid: give --threshold")
        rule = PatchConfig(mode=args.mode, alignment=args.alignment, threshold=theta or 0.0,
                           max_patch_length=args.max_patch_length, static_length=args.static_length,
                           relative_threshold=args.relative_threshold)
        all_lengths = patch_lengths(entropies, width=grid[1], **patch_kwargs(rule))
        pick = np.unique(np.linspace(0, len(all_lengths) - 1, num=min(args.batch_images or 8, len(all_lengths)))
                         .astype(np.int64))
        lengths = [all_lengths[i] for i in pick]
        layout_info.update(source="entropies", path=str(args.entropies), threshold=theta, mode=args.mode,
                           alignment=args.alignment, images=len(all_lengths))
        if args.mode == "global+monotonic":
            layout_info["relative_threshold"] = args.relative_threshold
        dataset = {"images": len(all_lengths),
                   "mean_patch_length": sum(map(sum, all_lengths)) / sum(map(len, all_lengths))}
    else:
        target = mean_length or PAPER_MEAN_PATCH_LENGTH.get(image_size)
        if target is None:
            raise UsageError(f"no paper statistics for a {grid[0]}x{grid[1]} grid: give --mean-patch-length")
        lengths = lengths_with_mean(grid, target, args.max_patch_length, args.batch_images or 1)
        layout_info.update(source="even layout of the given mean length", target_mean_patch_length=target)
    results = {name: measure(cfg, patch_lengths=lengths, batch_images=len(lengths), attention=args.attention,
                             probe=not args.full_depth, text_length=args.text_length) for name, cfg in cfgs.items()}
    layout_info.update(batch_images=len(lengths), mean_patch_length=results[model].mean_patch_length
                       if PRESETS[model]["kind"] == "dpar" else 1.0)
    record = {"model": model, "baseline": baseline, "image_size": image_size, "grid": list(grid),
              "codes_per_image": grid[0] * grid[1], "layout": layout_info,
              "models": {name: describe(name, m) for name, m in results.items()}}
    base, ours = results[baseline], results[model]
    record["reduction"] = 1 - ours.fvcore.train_per_image() / base.fvcore.train_per_image()
    record["global_position_ratio"] = base.global_positions_per_image / ours.global_positions_per_image
    if dataset is not None:  # the analytic count over every image read: the data set's mean saving
        per = {}
        for name, cfg in cfgs.items():
            b = analytic_breakdown(cfg, batch_images=len(all_lengths), patch_lengths=all_lengths,
                                   attention=args.attention, text_lengths=args.text_length or None)
            per[name] = TRAIN_FACTOR * b.total / len(all_lengths)
        dataset.update(train_flops_per_image=per, reduction=1 - per[model] / per[baseline])
        record["dataset"] = dataset
    return record, results


def fmt_g(x: float) -> str:
    return f"{x / 1e9:,.1f}" if abs(x) >= 1e10 else f"{x / 1e9:.4f}"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))


def print_compare(record: dict, tolerance: float) -> None:
    from dpar_scale.flops.analytic import TRAIN_FACTOR

    lay = record["layout"]
    where = f"{record['image_size']} px (" if record["image_size"] else "a "
    print(f"{record['model']} vs {record['baseline']} at {where}{record['grid'][0]}x{record['grid'][1]} grid = "
          f"{record['codes_per_image']} codes per image{')' if record['image_size'] else ''}")
    src = lay["source"]
    extra = (f"target {lay['target_mean_patch_length']}" if "target_mean_patch_length" in lay else
             f"θ {lay['threshold']}, {lay['mode']}/{lay['alignment']}, "
             f"{lay['batch_images']} of {lay['images']} images")
    print(f"DPAR layout ({src}): mean patch length {lay['mean_patch_length']:.4f} ({extra}; P_max "
          f"{lay['max_patch_length']}), {lay['batch_images']} image(s) counted\n")
    print("GFLOP per image (FLOPs = 2 x multiply-adds), counted by fvcore; groups are the forward's weight matmuls, "
          "attention apart")
    rows = []
    for name, m in record["models"].items():
        g = m["forward_flops_per_image_by_group"]
        rows.append([name, f"{m['params'] / 1e6:,.1f}M", f"{m['global_positions_per_image']:.1f}"]
                    + [fmt_g(g[k]) for k in GROUP_COLUMNS]
                    + [fmt_g(m["forward_flops_per_image"]), fmt_g(m["train_flops_per_image"])])
    print_table(["model", "params", "global pos", *GROUP_COLUMNS, "forward", f"train (x{TRAIN_FACTOR})"], rows)
    print("\ncross-check, forward GFLOP per image (must agree within "
          f"{100 * tolerance:g}%)")
    rows = []
    for name, m in record["models"].items():
        c = m["forward_flops_per_image_by_counter"]
        rows.append([name, fmt_g(c["fvcore"]), fmt_g(c["FlopCounterMode"]), fmt_g(c["analytic"]),
                     f"{100 * m['max_disagreement']:.4f}%"])
    print_table(["model", "fvcore (x2)", "FlopCounterMode", "analytic", "max diff"], rows)
    base, ours = record["models"][record["baseline"]], record["models"][record["model"]]
    print(f"\ntraining FLOPs per image: {record['baseline']} {fmt_g(base['train_flops_per_image'])} GFLOP -> "
          f"{record['model']} {fmt_g(ours['train_flops_per_image'])} GFLOP = {100 * record['reduction']:.2f}% fewer")
    print(f"global positions per image: {base['global_positions_per_image']:.1f} -> "
          f"{ours['global_positions_per_image']:.1f} ({record['global_position_ratio']:.3f}x fewer)")
    if "dataset" in record:
        d = record["dataset"]
        print(f"whole entropy set (analytic, {d['images']} images, mean patch length {d['mean_patch_length']:.4f}): "
              f"{100 * d['reduction']:.2f}% fewer training FLOPs")


def print_grid(records: list[dict]) -> None:
    rows = []
    for r in records:
        base, ours = r["models"][r["baseline"]], r["models"][r["model"]]
        rows.append([r["model"].split("-", 1)[1].upper(), str(r["image_size"]),
                     f"{r['layout']['mean_patch_length']:.3f}",
                     f"{base['params'] / 1e6:,.1f}M", f"{ours['params'] / 1e6:,.1f}M",
                     fmt_g(base["train_flops_per_image"]), fmt_g(ours["train_flops_per_image"]),
                     f"{100 * r['reduction']:.1f}%",
                     f"{base['global_positions_per_image']:.0f} -> {ours['global_positions_per_image']:.1f}",
                     f"{max(base['max_disagreement'], ours['max_disagreement']) * 100:.3f}%"])
    print("Training GFLOP per image (fvcore, FLOPs = 2 x multiply-adds, train = 3 x forward), LlamaGen GPT vs DPAR")
    print_table(["size", "px", "mean len", "GPT params", "DPAR params", "GPT train", "DPAR train", "reduction",
                 "global positions", "max diff"], rows)


@entry_point
def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--model", default="dpar-xl")
    ap.add_argument("--baseline", default="gpt-xl")
    ap.add_argument("--image-size", type=positive_int, default=384,
                    help="pixels; the VQ-16 grid is image-size / 16 (a --entropies folder's own grid wins)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--mean-patch-length", type=positive_float, help="default: the paper's (1.81 @256, 2.06 @384)")
    src.add_argument("--entropies", type=existing_path,
                     help="entropy folder (tools/compute_entropy.py) or .npy [n, H*W]")
    ap.add_argument("--threshold", type=float, help="θ in nats (default: the paper's, 7.8 @256, 7.9 @384)")
    ap.add_argument("--max-patch-length", type=positive_int, default=4)
    ap.add_argument("--mode", default="global", choices=["global", "monotonic", "global+monotonic", "static"])
    ap.add_argument("--relative-threshold", type=float, default=0.0, help="θ_rel of --mode global+monotonic")
    ap.add_argument("--alignment", default="reference", choices=["reference", "blt"])
    ap.add_argument("--static-length", type=positive_float, default=2,
                    help="mode static: patch length (fractional: that mean length)")
    ap.add_argument("--batch-images", type=non_negative_int, default=0,
                    help="images in the counted forward (default 1 with --mean-patch-length, 8 with --entropies)")
    ap.add_argument("--max-images", type=positive_int, default=20000, help="entropy rows read for the data-set mean")
    ap.add_argument("--attention", default="full", choices=["full", "exact"],
                    help="causal attention as the full L² (default) or the L(L+1)/2 pairs the mask allows")
    ap.add_argument("--full-depth", action="store_true", help="count the full-depth model, not the probe")
    ap.add_argument("--vocab", type=positive_int, help="codebook size (default: the entropies' codes, else 16384)")
    ap.add_argument("--classes", type=positive_int, default=1000)
    ap.add_argument("--tolerance", type=positive_float, default=0.02,
                    help="largest allowed disagreement of the counters")
    ap.add_argument("--all", action="store_true", help="the B/L/XL/XXL x 256/384 px grid at the paper's statistics")
    ap.add_argument("--dpar", default="every,false", metavar="INJECTION,FFN",
                    help="DPAR structure: model.dpar.decoder_injection (every | first) and model.dpar.cross_attn_ffn "
                         "(true | false); default every,false (the authors' code)")
    ap.add_argument("--verify", default="full", choices=("full", "size"),
                    help="an --entropies folder: check its shards' sha256 (full) or only their sizes (values always)")
    ap.add_argument("--text-length", type=non_negative_int, default=0,
                    help="count text-to-image models (model.conditioning=text) with captions of this many tokens "
                         "(the prefix replaces the class position); 0 = class-conditional")
    ap.add_argument("--text-vocab", type=positive_int, default=32000, help="rows of the text embedding (not counted: "
                    "lookups are free) for --text-length")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    from dpar_scale.config import ConfigError, parse_dpar_structure, to_dict
    from dpar_scale.patching.rule import PAPER_MEAN_PATCH_LENGTH

    try:
        args.structure = parse_dpar_structure(args.dpar)
    except ConfigError as err:
        raise UsageError(f"--dpar: {err}") from None
    if (args.mode == "global+monotonic") != (args.relative_threshold != 0):
        raise UsageError("--relative-threshold (> 0) goes with --mode global+monotonic, and only with it")

    out = {"conventions": conventions(args.attention, not args.full_depth), "dpar_structure": to_dict(args.structure)}
    print(f"DPAR structure: model.dpar.decoder_injection={args.structure.decoder_injection} "
          f"model.dpar.cross_attn_ffn={str(args.structure.cross_attn_ffn).lower()}\n")
    failures = []
    if args.all:
        args.vocab = args.vocab or 16384
        counted = [compare(args, f"dpar-{size}", f"gpt-{size}", px, (px // 16, px // 16),
                           args.mean_patch_length or PAPER_MEAN_PATCH_LENGTH[px])
                   for size in SIZES for px in sorted(PAPER_MEAN_PATCH_LENGTH)]
        records = [r for r, _ in counted]
        print_grid(records)
        out["grid"] = records
    else:
        grid, image_size, entropies = (args.image_size // 16,) * 2, args.image_size, None
        if args.entropies:
            entropies, data_grid, data_vocab = load_entropies(args.entropies, args.max_images, args.verify)
            args.vocab = args.vocab or data_vocab
            if data_grid and data_grid != grid:
                print(f"note: the entropies are on a {data_grid[0]}x{data_grid[1]} grid; counting on it")
                grid, image_size = data_grid, None
            if entropies.shape[1] != grid[0] * grid[1]:
                raise UsageError(f"{args.entropies}: rows of {entropies.shape[1]} entropies, a {grid[0]}x{grid[1]} "
                                 f"grid has {grid[0] * grid[1]} codes (set --image-size)")
        args.vocab = args.vocab or 16384
        counted = [compare(args, args.model, args.baseline, image_size, grid, args.mean_patch_length, entropies)]
        records = [counted[0][0]]
        print_compare(records[0], args.tolerance)
        out.update(records[0])
    print("\nconventions:\n" + "\n".join(f"  {k}: {v}" for k, v in out["conventions"].items()))
    for r, measurements in counted:
        for name, m in measurements.items():
            try:
                m.check(args.tolerance)
            except AssertionError as err:
                failures.append(f"{name} on the {r['grid'][0]}x{r['grid'][1]} grid: {err}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    if failures:
        print("\nERROR: the FLOP counters disagree:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
