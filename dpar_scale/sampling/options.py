"""Command-line options shared by the sampling tools (tools/sample.py, tools/sample_ddp.py), defined once.

`add_sampling_arguments` adds what every sampler takes (guidance, filters, seed, where the tokenizer and the
entropy model come from, batch size, device); `add_patch_rule_arguments` the inference-time patch rule of a
DPAR checkpoint, which `patch_rule_overrides` turns into dotted `model.patch.*` overrides (applied by
`dpar_scale.checkpoint.sampling_inputs.load_sampling_inputs`, which refuses them for a GPT). Paper Table 6:
DPAR-L trained at θ = 7.8 keeps its FID when sampled at θ = 8.1 (3.32 -> 3.39), a static-patch model does not.
"""
from __future__ import annotations

import argparse

PATCH_MODES = ("global", "monotonic", "global+monotonic", "static")


def add_sampling_arguments(parser: argparse.ArgumentParser, *, batch_size: int) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint folder of a gpt or dpar run, or an export (folder or its model.safetensors)")
    parser.add_argument("--cfg-scale", type=float, default=None,
                        help="classifier-free guidance scale (1 = off); default: the checkpoint's sample.cfg_scale "
                             "(2.0 unless its config says otherwise)")
    parser.add_argument("--seed", type=int, default=0, help=">= 0; sample i's random stream is a function of "
                                                              "(seed, i)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--temperature", type=float, default=1.0, help="<= 0 is greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--tokenizer-path", default="", help="default: the codes manifest's tokenizer")
    parser.add_argument("--tokenizer", default="", help="tokenizer name when it cannot be read from the manifest")
    parser.add_argument("--entropy-checkpoint", default="", help="DPAR: default: the entropy manifest's checkpoint")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="images generated together")
    add_patch_rule_arguments(parser)


def add_patch_rule_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inference-time patch rule (DPAR only; default: the checkpoint's "
                                      "model.patch)")
    group.add_argument("--threshold", type=float, default=None, help="θ in nats")
    group.add_argument("--max-patch-length", type=int, default=None, help="P_max")
    group.add_argument("--patch-mode", choices=PATCH_MODES, default=None)
    group.add_argument("--relative-threshold", type=float, default=None,
                       help="θ_rel of global+monotonic (0 to switch a global+monotonic checkpoint to another mode)")


def patch_rule_overrides(args: argparse.Namespace) -> list[str]:
    """Dotted overrides of the checkpoint's model.patch for the flags that were given."""
    out = []
    for flag, key in (("threshold", "threshold"), ("max_patch_length", "max_patch_length"), ("patch_mode", "mode"),
                      ("relative_threshold", "relative_threshold")):
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"model.patch.{key}={value}")
    return out


def apply_config_defaults(args: argparse.Namespace, cfg) -> None:
    """Fills the options left unset (None) from the checkpoint config's `sample` section: --cfg-scale and, for
    the tools that have it, --resize."""
    if args.cfg_scale is None:
        args.cfg_scale = cfg.sample.cfg_scale
    if getattr(args, "resize", 0) is None:
        args.resize = cfg.sample.resize


def check_sampling_arguments(args: argparse.Namespace) -> str | None:
    """The first problem with the shared options, as a message, or None."""
    if args.batch_size < 1:
        return "--batch-size must be >= 1"
    if args.seed < 0:
        return f"--seed must be >= 0, got {args.seed}"
    if args.top_k < 0:
        return f"--top-k must be >= 0 (0 = off), got {args.top_k}"
    if not 0.0 < args.top_p <= 1.0:
        return f"--top-p must be in (0, 1] (1 = off), got {args.top_p}"
    return None
