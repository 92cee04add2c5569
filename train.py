#!/usr/bin/env python
"""Train a model (kind: gpt | entropy | dpar):  python train.py --config PATH [dotted.key=value ...]

The run folder is the config's run.output_dir: config.yaml, metrics.jsonl, checkpoints/step-XXXXXX/.
"""
import argparse
import sys

from dpar_scale.config import ConfigError, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (configs/demo/dpar.yaml, ...)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 model.dim=64")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from dpar_scale.trainer import Trainer

    try:
        result = Trainer(cfg).fit()
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: step {result.get('step')} loss {result.get('loss'):.4f} "
          f"val_loss {result.get('val_loss', float('nan')):.4f} checkpoint {result['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
