#!/usr/bin/env python
"""Export a training checkpoint (sharded DCP or DeepSpeed ZeRO) as one consolidated safetensors file + config JSON.

    python tools/export.py RUN/checkpoints/step-000300 [--out DIR] [--no-ema] [--json summary.json]
    python tools/export.py RUN/checkpoints/step-000300 --universal      (DeepSpeed checkpoints only)

Writes DIR/model.safetensors (fp32 full tensors under the model's parameter names; EMA weights when the checkpoint
has them, unless --no-ema) and DIR/config.json (the run's resolved config). DIR defaults to
RUN/exports/step-000300. The shards are read in this one process, whatever layout wrote them, so it needs the
memory of one full fp32 copy of the model and no GPU. tools/sample.py --checkpoint takes DIR (or the checkpoint
folder itself).

--universal converts a DeepSpeed checkpoint in place (adds deepspeed/state_universal, DeepSpeed's universal
checkpoint, and its completion marker deepspeed/state_universal.complete.json) so it can resume on a different
number of processes. train.py does this itself on such a resume (rank 0 with parallel workers, the others wait
for the marker); doing it ahead of time keeps the conversion out of the job's allocation. A conversion without its
marker (interrupted) or whose files no longer match it is redone.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpar_scale.cli import entry_point, existing_path, parser  # noqa: E402


def default_out(checkpoint: Path) -> Path:
    """RUN/checkpoints/step-N -> RUN/exports/step-N; anything else -> CHECKPOINT-export."""
    from dpar_scale.checkpoint.save_load import STEP_DIR

    if STEP_DIR.match(checkpoint.name) and checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / "exports" / checkpoint.name
    return checkpoint.with_name(checkpoint.name + "-export")


@entry_point
def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("checkpoint", type=existing_path, help="checkpoint folder, e.g. runs/demo/dpar/checkpoints/step-000300")
    ap.add_argument("--out", default="", help="output folder (default: RUN/exports/step-N)")
    ap.add_argument("--no-ema", action="store_true", help="export the raw weights even when EMA weights exist")
    ap.add_argument("--json", default="", help="also write the summary here")
    ap.add_argument("--universal", action="store_true",
                    help="DeepSpeed: add the universal form (resume on another process count) instead of exporting")
    args = ap.parse_args(argv)
    checkpoint = Path(args.checkpoint)
    t0 = time.perf_counter()
    if args.universal:
        from dpar_scale.train.deepspeed_engine import make_universal

        target = make_universal(checkpoint)
        print(f"universal DeepSpeed checkpoint: {target} ({time.perf_counter() - t0:.1f} s); resume on any number "
              f"of processes with checkpoint.resume={checkpoint}")
        return 0
    from dpar_scale.checkpoint.export import export_checkpoint

    out = Path(args.out) if args.out else default_out(checkpoint)
    summary = export_checkpoint(checkpoint, out, use_ema=not args.no_ema)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    print(f"{summary['kind']} model, {summary['parameters']:,} parameters in {summary['tensors']} tensors "
          f"({summary['weights']} weights of {summary['source']}) -> {summary['out']} + {summary['config']} "
          f"in {summary['seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
