"""The embedded demos' shared first half (tools/demo.py, tools/demo_text.py): pictures, embedded evaluator, image
tokenizer, codes (+ caption shards for the text demo), entropy model, entropies and θ, and the demo's training runs.
Each stage is one of the project's tools, skipped when its output is complete, so both demos share one folder and
whichever runs second reuses what the first made."""
from __future__ import annotations

import json
from pathlib import Path

from dpar_scale.launch.stages import Stages

# 64 px pictures, 8x8-pixel blocks: 8x8 = 64 codes per image. The 16x16 grid of 4x4 blocks costs 4x the compute
# per image, and at the CPU budget of the demo its models saw too few images to learn objects (see README).
IMAGE_SIZE, BLOCK_SIZE, CODEBOOK = 64, 8, 512
# coarse detail: the pictures' textures and objects at the scale of an 8x8-pixel code. With generator v1's fine
# textures (1-5 px) the evaluator recognised 53% of this tokenizer's reconstructions (disc 0%, dots 4%), coarse 81%
# (discs came back as squares: edge codes of every colour pair, checkers of 5-px cells as stripes);
# coarse-palette (8 hues, textures 3.2x): 95% (see README)
DETAIL = "coarse-palette"
# 1,000 pictures per class: on 300 (6,000 code rows with flips) a 2,000-step GPT overfitted — class accuracy 67%
# at 1,000 steps, 61% at 2,000, FID-domain 114 -> 141
NUM_PER_CLASS = 1000
EVALUATOR_EPOCHS = 3  # 423 steps on 9,000 pictures: 99.8% held-out (5 epochs: 99.9%, 1.7x the time)
TARGET_MEAN_PATCH_LENGTH = 1.81  # the paper's 256 px statistic
MAX_PATCH_LENGTH = 4
# --quick: every training stage still runs, in seconds
QUICK_TRAIN = ["train.log_every=5", "train.val_batches=1", "data.batch_size=8", "train.progress_bar=false",
               "eval.num_samples=10", "eval.batch_size=10"]


class DemoData:
    def __init__(self, stages: Stages, out: Path, root: Path, quick: bool):
        self.stages, self.out, self.root, self.quick = stages, out, root, quick
        self.data = out / "data"
        self.images, self.codes = self.data / "images", self.data / "codes"
        self.tokenizer, self.evaluator = self.data / "tokenizer.safetensors", self.data / "evaluator.pt"

    def prepare(self, per_class: int, captions: bool = False) -> None:
        """Pictures, evaluator, tokenizer (judged by the evaluator: the ceiling on a model's class accuracy over its
        codes) and codes; with `captions` the caption shards beside the codes too (added to finished codes)."""
        run = self.stages.run
        drawn = self.images / "classes.json"
        found = json.loads(drawn.read_text()).get("detail", "fine") if drawn.is_file() else None
        if found is not None and found != DETAIL:
            # a folder from before the demo drew coarse pictures: its evaluator, tokenizer and codes are of those
            from dpar_scale.cli import UsageError
            raise UsageError(f"{self.out} holds pictures drawn at detail {found!r}, the demo draws {DETAIL!r}: "
                             f"rerun with --fresh (or another --out) to make its data again")
        if found is None:
            run("dataset", ["tools/make_dataset.py", "--out", self.images, "--num-per-class", per_class,
                            "--classes", 10, "--image-size", IMAGE_SIZE, "--seed", 0, "--detail", DETAIL])
        if not self.evaluator.is_file():
            # --quick: a few steps cannot reach the 95% held-out accuracy the tool asks for; the stage still runs
            fit = ["--max-steps", 3, "--allow-low-accuracy"] if self.quick else ["--epochs", EVALUATOR_EPOCHS]
            run("evaluator", ["tools/fit_evaluator.py", "--images", self.images, "--out", self.evaluator, "--json",
                              self.data / "evaluator.json", "--no-progress", *fit])
        if not self.tokenizer.is_file():
            run("tokenizer", ["tools/fit_tokenizer.py", "--images", self.images, "--out", self.tokenizer,
                              "--codebook-size", CODEBOOK, "--block-size", BLOCK_SIZE, "--image-size", IMAGE_SIZE,
                              "--evaluator", self.evaluator, "--json", self.data / "tokenizer.json"])
        if not self.reference_cache().is_file():
            # the evaluations during training read these statistics; the two runs side by side would each extract
            # them from all the pictures at their first evaluation
            run("reference", ["tools/evaluate.py", "--reference", self.images, "--image-size", IMAGE_SIZE,
                              "--features", f"domain:{self.evaluator}", "--no-progress"])
        done = self.codes / "captions" / "manifest.json" if captions else self.codes / "manifest.json"
        if not done.is_file():
            run("codes", ["tools/extract_codes.py", "--images", self.images, "--out", self.codes, "--tokenizer",
                          "kmeans", "--tokenizer-path", self.tokenizer, "--image-size", IMAGE_SIZE, "--flip",
                          *(["--captions", self.images / "captions.jsonl"] if captions else [])])

    def reference_cache(self) -> Path:
        """Where tools/evaluate.py caches the pictures' statistics under the evaluator (evaluation/reference.py)."""
        from dpar_scale.data.shards import sha256_file

        return self.data / f"images.stats-{sha256_file(self.evaluator)[:16]}-{IMAGE_SIZE}px.npz"

    def train(self, name: str, config: str, extra: list) -> Path:
        """train.py on configs/demo/<config>.yaml into <out>/<name> unless its last checkpoint is complete (one of
        an older format is retrained); the last checkpoint's folder."""
        return self.train_together({name: (config, extra)})[name]

    def train_together(self, runs: dict[str, tuple[str, list]]) -> dict[str, Path]:
        """`train` for each {name: (config, overrides)}, the runs still to do side by side (Stages.run_together:
        the cores split between them, progress bars off, a log line per train.log_every steps instead)."""
        from dpar_scale.checkpoint.save_load import is_complete, step_folder
        from dpar_scale.config import load_config

        done, todo = {}, {}
        for name, (config, extra) in runs.items():
            overrides = [f"run.output_dir={self.out / name}", f"data.codes_dir={self.codes}", *extra,
                         *(QUICK_TRAIN if self.quick else [])]
            config_file = f"configs/demo/{config}.yaml"
            cfg = load_config(self.root / config_file, overrides)
            done[name] = step_folder(cfg.run.output_dir, cfg.train.steps)
            if not is_complete(done[name]):
                todo[name] = ["train.py", "--config", config_file, *overrides]
        if len(todo) > 1:
            todo = {name: [*args, *(["train.progress_bar=false"] if "train.progress_bar=false" not in args else [])]
                    for name, args in todo.items()}
        self.stages.run_together(todo)
        return done

    def threshold(self) -> tuple[float, Path]:
        """(θ, its calibration file): entropy model, every code's entropy, θ for the target mean patch length."""
        entropy_ckpt = self.train("entropy", "entropy", ["train.steps=10"] if self.quick else [])
        if not (self.codes / "entropy" / "manifest.json").is_file():
            self.stages.run("entropies", ["tools/compute_entropy.py", "--checkpoint", entropy_ckpt, "--codes",
                                          self.codes])
        theta_file = self.out / "threshold.json"
        if not theta_file.is_file():
            self.stages.run("threshold", ["tools/calibrate_threshold.py", "--entropy", self.codes / "entropy",
                                          "--target-mean-length", TARGET_MEAN_PATCH_LENGTH, "--max-patch-length",
                                          MAX_PATCH_LENGTH, "--json", theta_file])
        return json.loads(theta_file.read_text())["threshold"], theta_file
