#!/usr/bin/env python
"""The whole DPAR pipeline on the embedded dataset (what `make demo` runs), using the same tools a user runs.

  images -> k-means tokenizer -> codes -> entropy model -> entropies -> θ -> DPAR and baseline GPT
  -> sample grids -> summary table (also written to <out>/summary.json)

Each stage is skipped when its output is already complete, so a second run reuses the data and models
(`--fresh` redoes everything). `--quick` shrinks every stage (for the test suite).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dpar_scale.cli import entry_point, non_negative_int, parser, positive_int  # noqa: E402

TARGET_MEAN_PATCH_LENGTH = 1.81  # the paper's 256 px statistic (16x16 codes)


def run(args: list[str], log: Path) -> None:
    """Runs one tool, streaming its output to the console and to the demo log."""
    args = [str(a) for a in args]
    cmd = [sys.executable, *args]
    print(f"\n$ {' '.join(str(a) for a in args)}", flush=True)
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(str(a) for a in args)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        # Pass output through in raw chunks so progress bars keep redrawing in place ('\r').
        while chunk := proc.stdout.read1(65536):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            f.write(chunk.decode(errors="replace"))
        if proc.wait() != 0:
            raise SystemExit(f"demo stage failed (exit {proc.returncode}): {' '.join(map(str, args))}; see {log}")


def final_checkpoint(run_dir: Path, steps: int) -> Path:
    return run_dir / "checkpoints" / f"step-{steps:06d}"


@entry_point
def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--out", default="runs/demo", help="demo folder (data, runs, samples, summary)")
    p.add_argument("--fresh", action="store_true", help="delete the demo folder first")
    p.add_argument("--quick", action="store_true", help="tiny sizes and step counts (seconds, for tests)")
    p.add_argument("--num-per-class", type=positive_int, default=300)
    p.add_argument("--steps", type=non_negative_int, default=0, help="override train.steps of the GPT and DPAR "
                                                                      "runs (0: the demo's own)")
    args = p.parse_args(argv)
    from dpar_scale.checkpoint.save_load import is_complete

    out = (ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    started = time.perf_counter()
    data = out / "data"
    images, tokenizer, codes = data / "images", data / "tokenizer.safetensors", data / "codes"
    per_class = 12 if args.quick else args.num_per_class
    entropy_steps = 10 if args.quick else 0
    model_steps = args.steps or (10 if args.quick else 0)
    quick = ["train.log_every=5", "train.val_batches=1", "data.batch_size=8", "train.progress_bar=false"]

    if not (images / "classes.json").is_file():
        run(["tools/make_dataset.py", "--out", images, "--num-per-class", per_class, "--classes", 10,
             "--image-size", 64, "--seed", 0], log)
    if not tokenizer.is_file():
        run(["tools/fit_tokenizer.py", "--images", images, "--out", tokenizer, "--codebook-size", 512], log)
    if not (codes / "manifest.json").is_file():
        run(["tools/extract_codes.py", "--images", images, "--out", codes, "--tokenizer", "kmeans",
             "--tokenizer-path", tokenizer, "--image-size", 64, "--flip"], log)

    def train(name: str, extra: list[str]) -> Path:
        from dpar_scale.config import load_config

        overrides = [f"run.output_dir={out / name}", f"data.codes_dir={codes}", *extra]
        if args.quick:
            overrides += quick
        cfg = load_config(ROOT / f"configs/demo/{name}.yaml", overrides)
        done = final_checkpoint(Path(cfg.run.output_dir), cfg.train.steps)
        if not is_complete(done):  # (a checkpoint of an older format is retrained)
            run(["train.py", "--config", f"configs/demo/{name}.yaml", *overrides], log)
        return done

    entropy_ckpt = train("entropy", [f"train.steps={entropy_steps}"] if entropy_steps else [])
    if not (codes / "entropy" / "manifest.json").is_file():
        run(["tools/compute_entropy.py", "--checkpoint", entropy_ckpt, "--codes", codes], log)
    theta_file = out / "threshold.json"
    if not theta_file.is_file():
        run(["tools/calibrate_threshold.py", "--entropy", codes / "entropy", "--target-mean-length",
             TARGET_MEAN_PATCH_LENGTH, "--max-patch-length", 4, "--json", theta_file], log)
    theta = json.loads(theta_file.read_text())["threshold"]

    steps = [f"train.steps={model_steps}"] if model_steps else []
    gpt_ckpt = train("gpt", steps)
    dpar_ckpt = train("dpar", [*steps, f"model.patch.threshold={theta}"])

    grids = {}
    for name, ckpt in (("gpt", gpt_ckpt), ("dpar", dpar_ckpt)):
        target = out / "samples" / name
        if not (target / "grid.png").is_file():
            run(["tools/sample.py", "--checkpoint", ckpt, "--classes", "0,1,2,3,4,5,6,7,8,9", "--num-per-class",
                 2 if args.quick else 4, "--cfg-scale", 2.0, "--seed", 0, "--out", target,
                 "--tokenizer-path", tokenizer], log)
        grids[name] = str(target / "grid.png")

    summary = summarize(out, theta_file, grids)
    summary["demo_seconds"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    return 0


def summarize(out: Path, theta_file: Path, grids: dict) -> dict:
    from dpar_scale.train.metrics_log import read_metrics

    calibration = json.loads(theta_file.read_text())
    rows = {}
    for name in ("gpt", "dpar"):
        records = read_metrics(out / name / "metrics.jsonl")
        train = [r for r in records if "step_time_s" in r]
        val = [r for r in records if r.get("val_loss") is not None]
        rows[name] = {
            "val_loss": val[-1]["val_loss"] if val else None,
            "train_loss": train[-1]["loss"] if train else None,
            "step_time_s": sum(r["step_time_s"] for r in train) / max(1, len(train)),
            "mean_patch_length": train[-1]["mean_patch_length"] if train else None,
            "global_positions_per_image": (train[-1]["global_positions_per_s"] / train[-1]["images_per_s"])
            if train else None,
            "sample_grid": grids[name],
        }
    manifest = json.loads((out / "data" / "codes" / "manifest.json").read_text())
    return {
        "codes_per_image": manifest["grid"][0] * manifest["grid"][1],
        "code_rows": manifest["num_images"],
        "threshold": calibration["threshold"],
        "calibrated_mean_patch_length": calibration["mean_patch_length"],
        "models": rows,
        "step_time_ratio_dpar_over_gpt": rows["dpar"]["step_time_s"] / rows["gpt"]["step_time_s"],
    }


def print_summary(s: dict) -> None:
    print("\n" + "=" * 78)
    print(f"DPAR demo summary: {s['code_rows']} code rows, {s['codes_per_image']} codes per image, "
          f"θ = {s['threshold']:.4f} nats, calibrated mean patch length {s['calibrated_mean_patch_length']:.3f}")
    print(f"{'model':<6} {'val loss':>9} {'train loss':>11} {'step s':>8} {'mean patch':>11} {'global pos/img':>15}")
    for name, r in s["models"].items():
        print(f"{name:<6} {r['val_loss']:>9.4f} {r['train_loss']:>11.4f} {r['step_time_s']:>8.3f} "
              f"{r['mean_patch_length']:>11.3f} {r['global_positions_per_image']:>15.1f}")
    print(f"measured step-time ratio DPAR / GPT: {s['step_time_ratio_dpar_over_gpt']:.3f}")
    for name, r in s["models"].items():
        print(f"samples {name}: {r['sample_grid']}")
    print(f"demo took {s.get('demo_seconds', 0):.0f} s")


if __name__ == "__main__":
    sys.exit(main())
