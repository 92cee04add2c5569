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
    assert summary["codes_per_image"] == 256 and summary["code_rows"] == 240  # 10 classes x 12 images x 2 views
    dpar, gpt = summary["models"]["dpar"], summary["models"]["gpt"]
    assert gpt["global_positions_per_image"] == 256
    assert 1.0 < dpar["mean_patch_length"] <= 4.0
    assert dpar["global_positions_per_image"] < 256
    for name in ("gpt", "dpar"):
        grid = Image.open(out / "samples" / name / "grid.png")
        assert grid.width > 2 * 64 and grid.height >= 10 * 64  # one row per class
    assert "DPAR demo summary" in done.stdout

    # A second run reuses every stage: no tool runs again.
    log_before = (out / "demo.log").read_text()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:]
    assert (out / "demo.log").read_text() == log_before
