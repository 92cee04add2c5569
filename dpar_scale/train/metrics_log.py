"""Where training numbers go: a console line, `metrics.jsonl` in the run folder, and wandb (offline by default)."""
from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path


class MetricsLogger:
    """Appends one JSON object per logged step to `<run>/metrics.jsonl` and mirrors it to wandb.

    wandb runs offline unless the config says online (so nothing leaves the machine by default); a run id is kept
    so a resumed run continues the same wandb run.
    """

    def __init__(self, output_dir: str | Path, *, enabled: bool = True, wandb_cfg=None, run_name: str = "",
                 config: dict | None = None, wandb_id: str | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.wandb_run = None
        self.wandb_id = wandb_id
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if wandb_cfg is not None and wandb_cfg.enabled and wandb_cfg.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_id = wandb_id or uuid.uuid4().hex[:12]
            self.wandb_run = wandb.init(
                project=wandb_cfg.project, name=run_name or Path(output_dir).name, id=self.wandb_id,
                resume="allow", mode=wandb_cfg.mode, dir=str(output_dir), config=config,
            )

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                               step=int(record.get("step", 0)))

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def format_line(record: dict) -> str:
    """A compact console line: `step 120 | loss 5.4321 | lr 1.00e-04 | …`."""
    parts = []
    for key, value in record.items():
        if key in ("sample_ids",):
            continue
        if isinstance(value, float):
            text = f"{value:.2e}" if key in ("lr",) or (value != 0 and abs(value) < 1e-3) else f"{value:.4g}"
        else:
            text = str(value)
        parts.append(f"{key} {text}")
    return " | ".join(parts)


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
