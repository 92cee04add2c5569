"""Where training numbers go: a console line, `metrics.jsonl` in the run folder, and wandb (offline by default).

After a resume from step S, the rows a lost attempt logged past S are superseded: they move from metrics.jsonl to
`metrics.superseded.jsonl` (each marked with `"superseded_at_resume_from": S`), so metrics.jsonl holds one row per
step (and one validation row per validated step). wandb gets the same treatment through its own run moments: the
run is rewound to S (`resume_from="<id>?_step=S"`: its history is cut after S and continues at S + 1), or, when
the checkpoint comes from another run folder, a new run forks off the one that wrote it (`fork_from`).
"""
from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path

from dpar_scale.flops.analytic import throughput

SUPERSEDED_FILE = "metrics.superseded.jsonl"


class MetricsLogger:
    """Appends one JSON object per logged step to `<run>/metrics.jsonl` and mirrors it to wandb.

    wandb runs offline unless the config says online (so nothing leaves the machine by default). `wandb_id` and
    `resumed_step` come from the checkpoint a run resumes (None for a new run); `own_run`: that checkpoint belongs
    to this run folder (else this is a new run continuing another one's checkpoint: a wandb fork).
    """

    def __init__(self, output_dir: str | Path, *, enabled: bool = True, wandb_cfg=None, run_name: str = "",
                 config: dict | None = None, wandb_id: str | None = None, resumed_step: int | None = None,
                 own_run: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.wandb_run = None
        self.wandb_id = wandb_id
        self.superseded = 0
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resumed_step is not None:
            self.superseded = supersede_rows_after(self.path, resumed_step)
        if wandb_cfg is not None and wandb_cfg.enabled and wandb_cfg.mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            common = {"project": wandb_cfg.project, "name": run_name or Path(output_dir).name,
                      "mode": wandb_cfg.mode, "dir": str(output_dir), "config": config}
            self.wandb_run = self._init_wandb(common, wandb_id, resumed_step, own_run)

    def _init_wandb(self, common: dict, saved_id: str | None, resumed_step: int | None, own_run: bool):
        import wandb

        if saved_id is None or resumed_step is None:  # a new run (or a checkpoint that named no wandb run)
            self.wandb_id = saved_id or uuid.uuid4().hex[:12]
            return wandb.init(id=self.wandb_id, resume="allow", **common)
        if own_run:  # the same wandb run, rewound when a lost attempt logged steps after the checkpoint
            self.wandb_id = saved_id
            moment = {"resume_from": f"{saved_id}?_step={resumed_step}"} if self.superseded else {"resume": "allow"}
        else:  # another run folder continuing this checkpoint: a new wandb run branching off at its step
            self.wandb_id = uuid.uuid4().hex[:12]
            moment = {"fork_from": f"{saved_id}?_step={resumed_step}"}
        try:
            run = wandb.init(id=self.wandb_id, **moment, **common)
        except Exception as e:  # rewind and fork are previews some wandb servers refuse; wandb raises many types
            print(f"dpar-scale: wandb refused {moment} ({type(e).__name__}: {e}); continuing wandb run "
                  f"{self.wandb_id} without rewinding it: its history may keep the lost attempt's rows after step "
                  f"{resumed_step} (metrics.jsonl does not)", file=sys.stderr, flush=True)
            run = wandb.init(id=self.wandb_id, resume="allow", **common)
        run.config.update({"resumed_from_step": resumed_step}, allow_val_change=True)
        return run

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


def supersede_rows_after(path: str | Path, step: int) -> int:
    """Moves the rows of metrics.jsonl logged for steps after `step` (by an attempt whose progress was lost) to
    metrics.superseded.jsonl beside it, marked with the step resumed from; metrics.jsonl is rewritten through a
    temporary file and one rename. Returns how many rows moved."""
    path = Path(path)
    rows = read_metrics(path)
    keep = [r for r in rows if r.get("step", 0) <= step]
    late = [r for r in rows if r.get("step", 0) > step]
    if not late:
        return 0
    with (path.parent / SUPERSEDED_FILE).open("a") as f:
        f.writelines(json.dumps({**r, "superseded_at_resume_from": step}) + "\n" for r in late)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    tmp.replace(path)
    return len(late)


def format_line(record: dict) -> str:
    """A compact console line: `step 120 | loss 5.4321 | lr 1.00e-04 | …`."""
    parts = []
    for key, value in record.items():
        if key in ("sample_ids", "flops_per_device"):
            continue
        if isinstance(value, float):
            text = f"{value:.2e}" if key in ("lr",) or (value != 0 and abs(value) < 1e-3) else f"{value:.4g}"
        else:
            text = str(value)
        parts.append(f"{key} {text}")
    return " | ".join(parts)


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl; a last line cut off by a kill (no newline, not JSON) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines[:-1]]
    if lines:
        try:
            rows.append(json.loads(lines[-1]))
        except json.JSONDecodeError:
            pass
    return rows


def new_window() -> dict:
    """A logging window's sums, what `window_rates` turns into rates."""
    return {"images": 0, "codes": 0, "global_positions": 0, "flops": 0.0, "time": 0.0, "steps": 0, "data_wait": 0.0}


def window_rates(window: dict, dp_size: int, dpar: bool, peak: float | None) -> dict:
    """Rates over one logging window of this rank's steps (images, codes, global positions, FLOPs, seconds):
    throughput of the whole data-parallel job, step time, and TFLOP/s / MFU per device (MFU only where the device's
    peak for the precision in use is known: GPU table or train.peak_tflops)."""
    seconds = max(window["time"], 1e-9)
    return {
        "images_per_s": window["images"] * dp_size / seconds,
        "codes_per_s": window["codes"] * dp_size / seconds,
        "global_positions_per_s": window["global_positions"] * dp_size / seconds,
        "mean_patch_length": (window["codes"] / max(1, window["global_positions"]
                                                     - window.get("cond_positions", window["images"]))
                              if dpar else 1.0),
        "step_time_s": seconds / window["steps"],
        # seconds a step waited for its batch (built in the loop, or not yet ready from the workers)
        "data_wait_s": window.get("data_wait", 0.0) / window["steps"],
        **throughput(window["flops"], seconds, peak=peak),
    }
