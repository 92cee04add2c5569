#!/usr/bin/env python
"""The whole DPAR pipeline on the embedded dataset (what `make demo` runs), using the same tools a user runs.

  images -> embedded evaluator -> k-means tokenizer (and how many of its reconstructions the evaluator recognises)
  -> codes -> entropy model -> entropies -> θ
  -> DPAR and baseline GPT (evaluated during training) -> sample grids
  -> summary table (<out>/summary.json, and results/demo_summary.json unless --quick)
  -> plot of FID-domain and validation loss against training FLOPs (<out>/fid_loss_vs_flops.png)

Each stage is skipped when its output is already complete, so a second run reuses the data and models
(`--fresh` redoes everything). `--quick` shrinks every stage (for the test suite); every stage still runs.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dpar_scale.launch.stages import Stages  # noqa: E402
from dpar_scale.cli import entry_point, non_negative_int, parser, positive_int  # noqa: E402
from dpar_scale.launch.demo_data import NUM_PER_CLASS  # noqa: E402

PLOT = "fid_loss_vs_flops.png"


def shown(path: Path) -> str:
    """A path as the summary records it: relative to the repository when inside it (the committed copy in
    results/ then names no one's checkout)."""
    path = Path(path)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _text_demo(args) -> int:
    """`make demo ARGS=--text`: tools/demo_text.py with this command line's folder, sizes and steps."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_text", ROOT / "tools" / "demo_text.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(["--out", str(args.out)] + (["--quick"] if args.quick else [])
                       + (["--steps", str(args.steps)] if getattr(args, "steps", 0) else []))


@entry_point
def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--out", default="runs/demo", help="demo folder (data, runs, samples, summary, plot)")
    p.add_argument("--fresh", action="store_true", help="delete the demo folder first")
    p.add_argument("--quick", action="store_true", help="tiny sizes and step counts (seconds, for tests)")
    p.add_argument("--num-per-class", type=positive_int, default=NUM_PER_CLASS)
    p.add_argument("--steps", type=non_negative_int, default=0, help="override train.steps of the GPT and DPAR "
                                                                      "runs (0: the demo's own)")
    p.add_argument("--json", default=None, help="also write the summary here (default: results/demo_summary.json; "
                                                "none with --quick)")
    p.add_argument("--text", action="store_true", help="the text-to-image demo instead (tools/demo_text.py: text "
                                                       "DPAR and GPT, prompt following)")
    args = p.parse_args(argv)
    if args.text:
        return _text_demo(args)
    from dpar_scale.config import load_config
    from dpar_scale.launch.demo_data import DemoData

    out = (ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out / "demo.log", cwd=ROOT)
    started = time.perf_counter()
    demo = DemoData(stages, out, ROOT, args.quick)
    demo.prepare(12 if args.quick else args.num_per_class)
    theta, theta_file = demo.threshold()

    # evaluation during training, against the real images with the evaluator, and validation at the same 5 points
    demo_config = load_config(ROOT / "configs/demo/gpt.yaml")
    steps = args.steps or (10 if args.quick else demo_config.train.steps)
    every = max(1, steps // 5)
    model_args = [f"train.steps={steps}", f"eval.every={every}", f"train.val_every={every}",
                  f"eval.detector=domain:{demo.evaluator}", f"eval.reference={demo.images}"]
    # side by side, a share of the cores each (Stages.run_together)
    ckpts = demo.train_together({"gpt": ("gpt", model_args),
                                 "dpar": ("dpar", [*model_args, f"model.patch.threshold={theta}"])})

    grids = {}
    for name, ckpt in ckpts.items():
        target, cfg = out / "samples" / name, load_config(ROOT / f"configs/demo/{name}.yaml")
        if not (target / "grid.png").is_file():
            stages.run(f"grid_{name}", ["tools/sample.py", "--checkpoint", ckpt, "--classes", "0,1,2,3,4,5,6,7,8,9",
                                        "--num-per-class", 2 if args.quick else 8,
                                        # drawn as that model's evaluations sample (configs/demo/<model>: eval.*)
                                        "--cfg-scale", cfg.eval.cfg_scale or cfg.sample.cfg_scale,
                                        "--top-k", cfg.eval.top_k, "--temperature", cfg.eval.temperature,
                                        "--seed", 0, "--out", target, "--tokenizer-path", demo.tokenizer])
        grids[name] = shown(target / "grid.png")

    summary = summarize(out, theta_file, grids, demo.evaluator)
    plot(summary, out / PLOT)
    summary["plot"] = shown(out / PLOT)
    summary["stage_seconds"] = stages.seconds  # stages that ran in this invocation (reused ones are absent)
    summary["demo_seconds"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    target = args.json if args.json is not None else ("" if args.quick else str(ROOT / "results/demo_summary.json"))
    if target:
        Path(target).write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return 0


def curves(records: list[dict]) -> dict:
    """FID-domain and validation loss against training FLOPs, from a run's metrics.jsonl rows. Validation rows
    carry no FLOP count: they take the one of the evaluation logged at the same step."""
    evals = [r for r in records if "fid_domain" in r]
    flops_at = {r["step"]: r["train_flops"] for r in evals}
    val = [r for r in records if r.get("val_loss") is not None and r["step"] in flops_at]
    return {"fid_domain": [(r["train_flops"], r["fid_domain"]) for r in evals],
            "class_accuracy": [(r["train_flops"], r["class_accuracy"]) for r in evals],
            "val_loss": [(flops_at[r["step"]], r["val_loss"]) for r in val]}


def summarize(out: Path, theta_file: Path, grids: dict, evaluator: Path) -> dict:
    from dpar_scale.train.metrics_log import read_metrics

    calibration = json.loads(theta_file.read_text())
    rows = {}
    for name in ("gpt", "dpar"):
        records = read_metrics(out / name / "metrics.jsonl")
        train = [r for r in records if "step_time_s" in r]
        val = [r for r in records if r.get("val_loss") is not None]
        evals = [r for r in records if "fid_domain" in r]
        last = evals[-1] if evals else {}
        rows[name] = {
            "val_loss": val[-1]["val_loss"] if val else None,
            "train_loss": train[-1]["loss"] if train else None,
            "step_time_s": sum(r["step_time_s"] for r in train) / max(1, len(train)),
            "steps": train[-1]["step"] if train else 0,
            "train_flops": last.get("train_flops"),
            **{k: last.get(k) for k in ("fid_domain", "precision", "recall", "class_accuracy")},
            "eval_step": last.get("step"),
            "mean_patch_length": train[-1]["mean_patch_length"] if train else None,
            "global_positions_per_image": (train[-1]["global_positions_per_s"] / train[-1]["images_per_s"])
            if train else None,
            "curves": curves(records),
            "sample_grid": grids[name],
        }
    manifest = json.loads((out / "data" / "codes" / "manifest.json").read_text())
    meta_file = evaluator.with_suffix(".json")
    held_out = json.loads(meta_file.read_text()).get("held_out_accuracy") if meta_file.is_file() else None
    tokenizer_file = out / "data" / "tokenizer.json"
    tokenizer = json.loads(tokenizer_file.read_text()) if tokenizer_file.is_file() else {}
    return {
        "codes_per_image": manifest["grid"][0] * manifest["grid"][1],
        "code_rows": manifest["num_images"],
        "threshold": calibration["threshold"],
        "calibrated_mean_patch_length": calibration["mean_patch_length"],
        "evaluator_held_out_accuracy": held_out,
        # the evaluator's class accuracy on held-out reconstructions: no model over these codes can do better
        "tokenizer_reconstruction_class_accuracy": tokenizer.get("reconstruction_class_accuracy"),
        "tokenizer_psnr_held_out_db": tokenizer.get("psnr_held_out_db"),
        "models": rows,
        "step_time_ratio_dpar_over_gpt": rows["dpar"]["step_time_s"] / rows["gpt"]["step_time_s"],
    }


def plot(s: dict, path: Path) -> None:
    from dpar_scale.evaluation.lineplot import Panel, Series, line_panels

    def series(key: str) -> list:
        return [Series(name.upper(), r["curves"][key]) for name, r in s["models"].items()]

    line_panels([Panel("FID-domain (lower is better)", "training FLOPs", "FID-domain", series("fid_domain")),
                 Panel("validation loss", "training FLOPs", "nats / code", series("val_loss"))], path,
                title=f"DPAR vs GPT per training FLOP, embedded data ({s['codes_per_image']} codes / image)")


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_summary(s: dict) -> None:
    print("\n" + "=" * 100)
    acc = s.get("evaluator_held_out_accuracy") or {}
    print(f"DPAR demo summary: {s['code_rows']} code rows, {s['codes_per_image']} codes per image, "
          f"θ = {s['threshold']:.4f} nats, calibrated mean patch length {s['calibrated_mean_patch_length']:.3f}; "
          f"evaluator held-out accuracy {_f(acc.get('class'), '.1%')}")
    print(f"tokenizer: held-out PSNR {_f(s.get('tokenizer_psnr_held_out_db'), '.2f')} dB; the evaluator recognises "
          f"{_f(s.get('tokenizer_reconstruction_class_accuracy'), '.1%')} of its reconstructions as their class "
          f"(the ceiling on a model's class accuracy over these codes)")
    print(f"{'model':<6} {'FID-domain':>10} {'precision':>9} {'recall':>7} {'class acc':>9} {'val loss':>9} "
          f"{'step s':>7} {'train FLOPs':>12} {'mean patch':>10} {'global pos/img':>14}")
    for name, r in s["models"].items():
        print(f"{name:<6} {_f(r['fid_domain'], '.2f'):>10} {_f(r['precision'], '.3f'):>9} "
              f"{_f(r['recall'], '.3f'):>7} {_f(r['class_accuracy'], '.1%'):>9} {_f(r['val_loss'], '.4f'):>9} "
              f"{r['step_time_s']:>7.3f} {_f(r['train_flops'], '.3e'):>12} {_f(r['mean_patch_length'], '.3f'):>10} "
              f"{_f(r['global_positions_per_image'], '.1f'):>14}")
    print(f"measured step-time ratio DPAR / GPT: {s['step_time_ratio_dpar_over_gpt']:.3f} (side by side, a share "
          f"of the cores each)")
    for name, r in s["models"].items():
        print(f"samples {name}: {r['sample_grid']}")
    print(f"plot: {s['plot']}")
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in s.get("stage_seconds", {}).items())
    print(f"demo took {s.get('demo_seconds', 0):.0f} s"
          + (f" ({stages}; gpt and dpar side by side)" if stages else ""))


if __name__ == "__main__":
    sys.exit(main())
