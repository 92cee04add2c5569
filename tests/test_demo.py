"""`make demo`'s pipeline end to end at toy scale: every stage runs through its real command-line tool."""
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def test_demo_pipeline_quick(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "tools/demo.py", "--quick", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["codes_per_image"] == 64 and summary["code_rows"] == 240  # 10 classes x 12 images x 2 views
    dpar, gpt = summary["models"]["dpar"], summary["models"]["gpt"]
    assert gpt["global_positions_per_image"] == 64
    assert 1.0 < dpar["mean_patch_length"] <= 4.0
    assert dpar["global_positions_per_image"] < 64
    assert 0.0 <= summary["evaluator_held_out_accuracy"]["class"] <= 1.0  # the evaluator was fitted
    assert 0.0 <= summary["tokenizer_reconstruction_class_accuracy"] <= 1.0  # and judged the tokenizer with it
    for r in (gpt, dpar):  # evaluated during training: 5 points (every 2 of 10 steps), FLOPs growing
        assert r["fid_domain"] > 0 and 0 <= r["class_accuracy"] <= 1 and 0 <= r["precision"] <= 1
        flops = [x for x, _ in r["curves"]["fid_domain"]]
        assert len(flops) == 5 and flops == sorted(flops) and flops[-1] == r["train_flops"]
        assert [x for x, _ in r["curves"]["val_loss"]] == flops  # validated at the same steps
    # the analytic count says DPAR costs fewer training FLOPs than the GPT of the same depth and data
    assert dpar["train_flops"] < gpt["train_flops"]
    plot = Image.open(out / "fid_loss_vs_flops.png")
    assert plot.width >= 800 and plot.height >= 300
    for name in ("gpt", "dpar"):
        grid = Image.open(out / "samples" / name / "grid.png")
        assert grid.width > 2 * 64 and grid.height >= 10 * 64  # one row per class
    assert "DPAR demo summary" in done.stdout and "FID-domain" in done.stdout

    # A second run reuses every stage: no tool runs again.
    log_before = (out / "demo.log").read_text()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:]
    assert (out / "demo.log").read_text() == log_before


def test_demo_refuses_a_folder_of_pictures_drawn_at_another_detail(tmp_path):
    """A demo folder from before the demo drew coarse pictures (classes.json without "detail", i.e. fine) holds an
    evaluator, tokenizer and codes of those pictures: reusing them would report the old data's figures as the new."""
    import pytest

    from dpar_scale.cli import UsageError
    from dpar_scale.launch.demo_data import DETAIL, DemoData
    from dpar_scale.launch.stages import Stages

    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    (images / "classes.json").write_text(json.dumps({"classes": ["00_disc"], "seed": 0}))
    demo = DemoData(Stages(tmp_path / "demo.log", cwd=tmp_path), tmp_path, tmp_path, quick=True)
    with pytest.raises(UsageError, match="--fresh"):
        demo.prepare(2)
    assert DETAIL != "fine" and not (tmp_path / "data" / "evaluator.pt").exists()  # nothing was run
