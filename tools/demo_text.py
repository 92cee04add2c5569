#!/usr/bin/env python
"""Text-to-image DPAR and GPT on the embedded dataset (`make demo ARGS=--text`), with the tools a user runs.

  images + captions.jsonl -> k-means tokenizer -> codes + caption shards -> sentencepiece text model
  -> entropy model -> entropies -> θ -> text DPAR and text GPT -> prompt-labelled grids
  -> prompt following: shape_accuracy / color_accuracy of samples against their prompts (the embedded evaluator's
     shape and colour heads, tools/fit_evaluator.py), against chance, next to FID-domain / precision / recall of
     the same samples against the real images (tools/sample_ddp.py --evaluate with the evaluator as detector, as
     the class demo evaluates) -> table (and <out>/text_summary.json)

The data, image tokenizer, entropy model and θ are the class demo's (same folders, reused when complete). The
evaluation prompts are not training captions: each is worded by the dataset's own caption templates
(`scene_captions`) from a real picture's attributes with its colour replaced by a seeded pick of the eight hue
words, so (shape, colour) is known for every prompt; `--eval-prompts` of them, `--num-per-prompt` samples each.
Chance: 1 / shapes for shape_accuracy, the share of the most frequent prompted colour for color_accuracy.
`--quick` shrinks every stage (seconds, for tests).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dpar_scale.launch.stages import Stages  # noqa: E402
from dpar_scale.cli import entry_point, parser, positive_int  # noqa: E402
from dpar_scale.launch.demo_data import NUM_PER_CLASS  # noqa: E402

TEXT_VOCAB = 128
GRID_PROMPTS = 10  # rows of the prompt-labelled grids


def evaluation_prompts(images: Path, count: int, seed: int = 0) -> list[dict]:
    """[{"prompt", "shape", "colour"}]: `count` prompts, classes in turn, colours drawn per prompt (sky_sun keeps
    its sun's colour; the object of every other class takes the drawn colour)."""
    import numpy as np

    from dpar_scale.data.synthetic_captions import COLOUR_NAMES, scene_captions

    rows = [json.loads(line) for line in (images / "attributes.jsonl").read_text().splitlines() if line.strip()]
    by_class: dict[int, list[dict]] = {}
    for row in rows:
        by_class.setdefault(int(row["class"]), []).append(row)
    rng = np.random.default_rng(seed)
    out = []
    classes = sorted(by_class)
    for k in range(count):
        base = dict(by_class[classes[k % len(classes)]][int(rng.integers(len(by_class[classes[k % len(classes)]])))])
        if base["shape"] != "sky_sun":
            colour = str(rng.choice(COLOUR_NAMES))
            base.update(colour=colour, colours=[colour])
        prompt = scene_captions(base, 1, rng)[0]
        out.append({"prompt": prompt, "shape": base["shape"], "colour": base["colour"]})
    return out


def prompt_following(samples: Path, prompts: list[dict], evaluator: Path) -> dict:
    """shape_accuracy / color_accuracy of the images of `samples` (tools/sample_ddp.py output: labels = prompt
    indices) under the evaluator's shape and colour heads, and their chance levels."""
    import numpy as np

    from dpar_scale.evaluation.domain_classifier import load_domain_classifier, predict

    model = load_domain_classifier(str(evaluator))
    heads = model.meta["heads"]
    with np.load(samples) as f:
        images, labels = f["arr_0"], f["labels"]
    pred = predict(model, images)
    out = {"samples": int(len(labels))}
    for head, key, name in (("shape", "shape", "shape_accuracy"), ("colour", "colour", "color_accuracy")):
        if head not in heads:
            out[name] = None
            continue
        values = list(heads[head])
        target = np.array([values.index(prompts[i][key]) if prompts[i][key] in values else -1 for i in labels])
        out[name] = float((pred[head] == target).mean())
        counts = np.bincount(target[target >= 0], minlength=len(values))
        out[name.replace("accuracy", "chance")] = (1 / len(values) if head == "shape"
                                                   else float(counts.max() / max(1, counts.sum())))
    return out


def print_summary(summary: dict) -> None:
    """The demo's table: per model FID-domain / precision / recall against the real images, validation loss, and
    shape / colour accuracy against the prompts, each beside its chance level."""
    rows = summary["models"]
    print("\n" + "=" * 78)
    print(f"text-to-image demo: {summary['prompts']} held-out prompts x {summary['samples_per_prompt']} samples, "
          f"{summary['train_steps']} training steps; FID-domain against "
          f"{next(iter(rows.values()))['num_reference']} real images")
    print(f"{'model':<10} {'FID-domain':>10} {'precision':>9} {'recall':>7} {'val loss':>9} {'shape acc':>10} "
          f"{'(chance)':>9} {'color acc':>10} {'(chance)':>9}")

    def fmt(x, spec=".3f"):
        return format(x, spec) if isinstance(x, float) else "n/a"

    for name, r in rows.items():  # (FID-domain's scale is the evaluator's features': hundreds, or ~1e-2 --quick)
        print(f"{name:<10} {fmt(r['fid_domain'], '.4g'):>10} {fmt(r['precision']):>9} {fmt(r['recall']):>7} "
              f"{fmt(r['val_loss']):>9} {fmt(r['shape_accuracy']):>10} {fmt(r.get('shape_chance')):>9} "
              f"{fmt(r['color_accuracy']):>10} {fmt(r.get('color_chance')):>9}")
    for name, r in rows.items():
        print(f"samples {name}: {r['grid']}")


@entry_point
def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--out", default="runs/demo", help="demo folder (shared with the class demo)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and step counts (seconds, for tests)")
    p.add_argument("--num-per-class", type=positive_int, default=NUM_PER_CLASS)
    p.add_argument("--steps", type=positive_int, default=None, help="train.steps of the text models "
                                                                        "(default: the class demo's, configs/demo/gpt.yaml)")
    p.add_argument("--eval-prompts", type=positive_int, default=50)
    p.add_argument("--num-per-prompt", type=positive_int, default=4)
    args = p.parse_args(argv)
    from dpar_scale.config import load_config
    from dpar_scale.launch.demo_data import DemoData
    from dpar_scale.train.metrics_log import read_metrics

    out = (ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out / "demo_text.log", cwd=ROOT)
    started = time.perf_counter()
    demo = DemoData(stages, out, ROOT, args.quick)
    images, tokenizer, evaluator = demo.images, demo.tokenizer, demo.evaluator
    text_model = demo.data / "text.model"
    steps = args.steps or (10 if args.quick else load_config(ROOT / "configs/demo/gpt.yaml").train.steps)
    n_prompts, per_prompt = (4, 2) if args.quick else (args.eval_prompts, args.num_per_prompt)

    demo.prepare(12 if args.quick else args.num_per_class, captions=True)  # the class demo's, plus the captions
    if not text_model.is_file():
        stages.run("text_tokenizer", ["tools/train_text_tokenizer.py", "--captions", images / "captions.jsonl",
                                      "--vocab-size", 48 if args.quick else TEXT_VOCAB, "--out", text_model])
    theta, _ = demo.threshold()
    text = ["model.conditioning=text", f"model.text.tokenizer={text_model}",
            f"model.text.vocab_size={48 if args.quick else TEXT_VOCAB}", "model.text.max_length=64",
            "model.text.dropout=0.1", f"train.steps={steps}"]
    ckpts = demo.train_together({"gpt-text": ("gpt", text),
                                 "dpar-text": ("dpar", [*text, f"model.patch.threshold={theta}"])})

    prompts = evaluation_prompts(images, n_prompts)
    prompt_file = out / "text_eval_prompts.txt"
    prompt_file.write_text("".join(p["prompt"] + "\n" for p in prompts))
    (out / "text_eval_prompts.json").write_text(json.dumps(prompts, indent=1))
    rows = {}
    for name, ckpt in ckpts.items():
        target = out / "samples" / name
        grid_prompts = out / "text_grid_prompts.txt"
        grid_prompts.write_text("".join(p["prompt"] + "\n" for p in prompts[:GRID_PROMPTS]))
        stages.run(f"grid_{name}", ["tools/sample.py", "--checkpoint", ckpt, "--prompts-file", grid_prompts,
                                    "--num-per-prompt", 4, "--cfg-scale", 2.0, "--seed", 0, "--out", target,
                                    "--tokenizer-path", tokenizer])
        evaluation = out / "samples" / f"{name}-eval"
        stages.run(f"eval_{name}", ["tools/sample_ddp.py", "--checkpoint", ckpt, "--captions", prompt_file,
                                    "--num-samples", n_prompts * per_prompt, "--cfg-scale", 2.0, "--seed", 0,
                                    "--out", evaluation, "--tokenizer-path", tokenizer, "--no-progress",
                                    "--evaluate", "--reference", images, "--features", f"domain:{evaluator}"])
        val = [r["val_loss"] for r in read_metrics(out / name / "metrics.jsonl") if r.get("val_loss") is not None]
        metrics = json.loads((evaluation / "metrics.json").read_text())
        rows[name] = {"val_loss": val[-1] if val else None, "grid": str(target / "grid.png"),
                      **{k: metrics[k] for k in ("fid_domain", "precision", "recall", "num_reference")},
                      **prompt_following(evaluation / "samples.npz", prompts, evaluator)}
    summary = {"models": rows, "prompts": len(prompts), "samples_per_prompt": per_prompt, "threshold": theta,
               "train_steps": steps, "seconds": round(time.perf_counter() - started, 1),
               "evaluator": str(evaluator), "fid_reference": str(images)}
    (out / "text_summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
