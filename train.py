#!/usr/bin/env python
"""Train a model (kind: gpt | entropy | dpar).

  python train.py --config PATH [dotted.key=value ...]                       one process
  torchrun --nproc_per_node N train.py --config PATH parallel.dp_shard=A parallel.tp=B [...]
                                                                             FSDP2 / HSDP / TP+SP (default engine)
  deepspeed --num_gpus N train.py --deepspeed_config configs/deepspeed/zero3.json --config PATH [...]
                                                                             DeepSpeed ZeRO (stage from the JSON)

The run folder is the config's run.output_dir: config.yaml, metrics.jsonl, checkpoints/step-XXXXXX/ (written by
rank 0; multi-process checkpoints add the sharded optimizer / DeepSpeed state).

SIGTERM (a scheduler's preemption; torchrun forwards it to every worker) or SIGUSR2 stops the run at the next
step boundary with a checkpoint; the exit status is then 128 + the signal's number (143 for SIGTERM), and
`checkpoint.resume=auto` continues from that checkpoint.
"""
import argparse
import signal
import sys

from dpar_scale.cli import entry_point, parser


@entry_point
def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--config", help="YAML config (configs/demo/dpar.yaml, ...)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                   help="DeepSpeed JSON (configs/deepspeed/zero{1,2,3}.json, zero3_offload.json): use the "
                        "DeepSpeed engine")
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 model.dim=64")
    args = p.parse_args(argv)
    from dpar_scale.config import load_config

    cfg = load_config(args.config, args.overrides)  # a ConfigError is one line (entry_point), before torch loads
    from dpar_scale.parallel.process_group import destroy_process_group, is_main_process
    from dpar_scale.train.stop_signals import StopOnSignals
    from dpar_scale.train.trainer import Trainer

    stop = StopOnSignals((signal.SIGTERM, signal.SIGUSR2))
    try:
        trainer = Trainer(cfg, deepspeed_config=args.deepspeed_config)
        stop.attach(trainer)
        result = trainer.fit()
    finally:
        stop.restore()
    main_process = is_main_process()
    destroy_process_group()
    if result.get("preempted"):
        if main_process:
            print(f"stopped by {stop.caught[0].name} at step {result['step']}: checkpoint {result['checkpoint']}; "
                  f"continue with checkpoint.resume=auto")
        return 128 + int(stop.caught[0]) if stop.caught else 1
    if main_process:
        print(f"done: step {result.get('step')} loss {result.get('loss', float('nan')):.4f} "
              f"val_loss {result.get('val_loss', float('nan')):.4f} checkpoint {result['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
