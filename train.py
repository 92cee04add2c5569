#!/usr/bin/env python
"""Train a model (kind: gpt | entropy | dpar).

  python train.py --config PATH [dotted.key=value ...]                       one process
  torchrun --nproc_per_node N train.py --config PATH parallel.dp_shard=A parallel.tp=B [...]
                                                                             FSDP2 / HSDP / TP+SP (default engine)
  deepspeed --num_gpus N train.py --deepspeed_config configs/deepspeed/zero3.json --config PATH [...]
                                                                             DeepSpeed ZeRO (stage from the JSON)

The run folder is the config's run.output_dir: config.yaml, metrics.jsonl, checkpoints/step-XXXXXX/ (written by
rank 0; multi-process checkpoints add the sharded optimizer / DeepSpeed state).
"""
import argparse
import sys

from dpar_scale.config import ConfigError, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (configs/demo/dpar.yaml, ...)")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                        help="DeepSpeed JSON (configs/deepspeed/zero{1,2,3}.json, zero3_offload.json): use the "
                             "DeepSpeed engine")
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 model.dim=64")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from dpar_scale.checkpoint.save_load import CheckpointError
    from dpar_scale.parallel.process_group import destroy_process_group, is_main_process
    from dpar_scale.train.trainer import Trainer

    try:
        result = Trainer(cfg, deepspeed_config=args.deepspeed_config).fit()
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        destroy_process_group()
        return 2
    if is_main_process():
        print(f"done: step {result.get('step')} loss {result.get('loss', float('nan')):.4f} "
              f"val_loss {result.get('val_loss', float('nan')):.4f} checkpoint {result['checkpoint']}")
    destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
