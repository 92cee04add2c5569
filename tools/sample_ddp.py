#!/usr/bin/env python
"""Generate an evaluation set (e.g. 50,000 images) from a GPT or DPAR checkpoint on any number of processes.

    torchrun --nproc_per_node N tools/sample_ddp.py --checkpoint PATH --num-samples 50000 --cfg-scale 2.0 \
        --seed 0 --out DIR [--per-class | --random-labels] [--png] [--resize 256] [--threshold θ] \
        [--max-patch-length P] [--patch-mode MODE] [--temperature 1.0] [--top-k 0] [--top-p 1.0] \
        [--batch-size 32] [--precision auto|bf16|fp32] [--tokenizer-path PATH] [--entropy-checkpoint PATH] \
        [--evaluate --reference REF (--inception PATH | --features domain:PATH) [--json OUT]]
        [--captions FILE [--text-tokenizer PATH]]      (text models: the caption set to sample)

Writes DIR/samples.npz (the ADM evaluator's layout: `arr_0` uint8 [N, H, W, 3], plus `labels` int64 [N]),
DIR/meta.json (settings, sources, world size, seconds, images/s; for DPAR the mean patch length and the global
positions per image), DIR/chunks/ (the unit of resume) and, with --png, DIR/png/NNNNNN.png.

The set of images does not depend on the number of processes: sample i's random stream and label are functions
of (seed, i, N), and samples [kB, (k+1)B) are always generated together as one batch (B = --batch-size), whichever
rank runs them; 1 and 8 processes write byte-identical samples.npz. A killed job restarted with the same
arguments (on any number of processes) verifies the chunks it finds, skips them, and writes the same file;
chunks from other settings are refused with the differences listed. Labels are balanced (N / classes each) in a
seeded shuffled order by default; --per-class sorts them by class; --random-labels draws them uniformly
(LlamaGen's protocol). bf16 autocast on CUDA, fp32 on CPU (--precision to choose); nccl on GPUs, gloo on CPU.
Text models: --captions FILE (one caption per line, or a captions.jsonl) is the caption set; `labels` then holds
each sample's caption index (balanced over the captions, or --per-class / --random-labels as for classes), and
DIR/captions.json the captions; --evaluate then reports no class_accuracy (a caption index is not a class).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dpar_scale.checkpoint.sampling_inputs import (SamplingInputError, describe_rule,  # noqa: E402
                                                   load_sampling_inputs)
from dpar_scale.cli import entry_point, parser  # noqa: E402
from dpar_scale.evaluation.cli import add_evaluation_arguments, detector_spec, evaluate_from_args  # noqa: E402
from dpar_scale.evaluation.sources import open_images  # noqa: E402
from dpar_scale.parallel import process_group as pg  # noqa: E402
from dpar_scale.sampling.chunked import SampleSettings, sample_to_folder  # noqa: E402
from dpar_scale.sampling.options import (add_sampling_arguments, apply_config_defaults,  # noqa: E402
                                         check_sampling_arguments, patch_rule_overrides)


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    add_sampling_arguments(p, batch_size=32)
    p.add_argument("--num-samples", type=int, default=50_000)
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--per-class", action="store_true",
                        help="balanced labels sorted by class (galleries; an IS over this order is meaningless)")
    labels.add_argument("--random-labels", action="store_true", help="labels drawn uniformly, as LlamaGen does")
    p.add_argument("--png", action="store_true", help="also write one PNG per sample under DIR/png/")
    p.add_argument("--resize", type=int, default=None,
                   help="bicubic resize to R x R before uint8 (0 = off); default: the checkpoint's sample.resize")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto: cuda:LOCAL_RANK when CUDA is available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--captions", default="", help="text models: the captions to sample (one per line, or jsonl)")
    p.add_argument("--text-tokenizer", default="", help="text models: default: the one the checkpoint carries")
    ev = p.add_argument_group("evaluation in the same job (--evaluate)")
    ev.add_argument("--evaluate", action="store_true",
                    help="after sampling, compute FID / IS / precision / recall (tools/evaluate.py) in the same "
                         "process group; --json defaults to DIR/metrics.json")
    add_evaluation_arguments(ev, required=False, prefix="eval-")
    return p.parse_args(argv)


def settings_from_args(args) -> SampleSettings:
    mode = "per-class" if args.per_class else "random" if args.random_labels else "balanced"
    return SampleSettings(num_samples=args.num_samples, seed=args.seed, cfg_scale=args.cfg_scale,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          batch_size=args.batch_size, labels=mode, resize=args.resize, precision=args.precision)


def pick_device(name: str) -> torch.device:
    """--device auto: this rank's GPU when there is one (cuda:LOCAL_RANK), else the CPU."""
    if name == "auto":
        return pg.default_device(pg.get_local_rank())
    if name == "cuda":
        return torch.device("cuda", pg.get_local_rank())
    return torch.device(name)


def run(args):
    """Everything after argument parsing, in an existing (or no) process group: the SamplingResult."""
    problem = check_sampling_arguments(args)
    if args.evaluate and not problem:
        detector_spec(args)  # before hours of sampling: --reference and a detector are given
    if problem or args.num_samples < 1 or (args.resize or 0) < 0:
        raise SamplingInputError(problem or "--num-samples must be >= 1 and --resize >= 0")
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    inputs = load_sampling_inputs(args.checkpoint, device=device, tokenizer_path=args.tokenizer_path,
                                  tokenizer_name=args.tokenizer, entropy_checkpoint=args.entropy_checkpoint,
                                  patch_overrides=patch_rule_overrides(args),
                                  text_tokenizer_path=args.text_tokenizer)
    apply_config_defaults(args, inputs.cfg)
    if inputs.text_tokenizer is not None:
        from dpar_scale.sampling.prompts import (PromptError, describe_unspellable, read_prompts_file,
                                                 unspellable_characters)

        if not args.captions:
            raise PromptError(f"{args.checkpoint} is a text model: give --captions FILE (the caption set to sample)")
        inputs.prompts = read_prompts_file(args.captions)
        if pg.get_rank() == 0:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "captions.json").write_text(json.dumps(inputs.prompts, ensure_ascii=False) + "\n")
            warning = describe_unspellable(unspellable_characters(inputs.text_tokenizer, inputs.prompts),
                                           inputs.prompts)
            if warning:
                print(warning, flush=True)
    elif args.captions:
        raise SamplingInputError(f"{args.checkpoint} is class-conditional: --captions applies to text models")
    settings = settings_from_args(args)
    if pg.get_rank() == 0:
        rule = f", patch rule {describe_rule(inputs.patch_cfg)}" if inputs.kind == "dpar" else ""
        print(f"{args.num_samples} samples of {args.checkpoint} ({inputs.kind}{rule}) on {pg.get_world_size()} "
              f"process(es), {device.type}, {settings.resolved_precision(device)}, chunks of {args.batch_size}, "
              f"labels {settings.labels}", flush=True)
    result = sample_to_folder(inputs, settings, args.out, device=device, png=args.png,
                              progress=not args.no_progress)
    if pg.get_rank() == 0:
        meta = result.meta
        rate = meta.get("images_per_second")
        line = (f"{result.samples_path}: {meta['num_samples']} images {tuple(meta['image_shape'])}, "
                f"{meta['images_generated']} generated now ({meta['chunks_resumed']} chunks resumed)"
                + (f", {rate:.2f} images/s" if rate else ""))
        if "dpar" in meta:
            line += f", mean patch length {meta['dpar']['mean_patch_length']:.3f}"
        print(line, flush=True)
    return result


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    env = pg.LaunchEnv.detect()
    # nccl on GPUs, gloo on CPU; nothing with one process. Ranks may wait long for the slowest one's chunks.
    pg.init_process_group(env, pick_device(args.device), timeout_s=2 * 3600)
    try:
        result = run(args)
        if args.evaluate:
            args.json = args.json or str(Path(args.out) / "metrics.json")
            samples = result.samples_path
            if args.captions:  # a text model's set (run() refuses --captions for class models)
                # its labels are caption indices: scored as classes they would give a meaningless class_accuracy
                samples = open_images(samples, what="samples")
                samples.labels = None
            evaluate_from_args(args, samples, pick_device(args.device), progress=not args.no_progress)
    finally:
        pg.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
