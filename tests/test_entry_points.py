"""Every entry point (train.py, tools/*.py, launchers/*.py: found by listing the folders, so a new tool is covered
when it lands) answers --help with status 0, and a bad argument with one `error: ...` line, status 2 and no
traceback. They run as real subprocesses, two at a time; the time each takes to answer --help (its import time) is
printed with `pytest -s`."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from parallel_helpers import REPO

ENTRY_POINTS = sorted(["train.py"] + [f"tools/{p.name}" for p in (REPO / "tools").glob("*.py")]
                      + [f"launchers/{p.name}" for p in (REPO / "launchers").glob("*.py")])
MISSING = "/nonexistent/dpar-scale-test"
# A mistake a user makes with each known entry point (a missing file or an out-of-range count); an entry point not
# listed here (a new tool) gets an option that does not exist instead.
BAD_ARGUMENTS = {
    "train.py": ["--config", f"{MISSING}.yaml"],
    "tools/bench_captions.py": ["--rows", "0"],
    "tools/bench_checkpoint.py": ["--batch", "0"],
    "tools/bench_data.py": ["--steps", "0"],
    "tools/bench_parallel.py": ["--layouts", "dp3"],
    "tools/bench_sample.py": ["--batch", "-1"],
    "tools/bench_train.py": ["--codes", MISSING],
    "tools/bench_verify.py": ["--rows", "0"],
    "tools/calibrate_threshold.py": ["--entropy", MISSING, "--target-mean-length", "1.8"],
    "tools/check_resume.py": ["--config", f"{MISSING}.yaml"],
    "tools/compute_entropy.py": ["--checkpoint", MISSING, "--codes", MISSING],
    "tools/count_flops.py": ["--entropies", MISSING],
    "tools/count_params.py": ["--vocab", "0"],
    "tools/demo.py": ["--num-per-class", "0"],
    "tools/estimate.py": ["--config", "configs/paper/dpar-b-256.yaml", "--gpus", "0"],
    "tools/export.py": [MISSING],
    "tools/extract_codes.py": ["--images", MISSING, "--out", MISSING, "--tokenizer", "kmeans", "--tokenizer-path",
                               MISSING, "--image-size", "64"],
    "tools/fit_tokenizer.py": ["--images", MISSING, "--out", f"{MISSING}.safetensors"],
    "tools/fit_evaluator.py": ["--images", MISSING, "--out", f"{MISSING}.pt"],
    "tools/make_dataset.py": ["--out", MISSING, "--classes", "0"],
    "tools/train_text_tokenizer.py": ["--captions", f"{MISSING}.jsonl", "--vocab-size", "64", "--out", "t.model"],
    "tools/sample.py": ["--checkpoint", MISSING, "--classes", "0", "--out", MISSING],
    "tools/sample_ddp.py": ["--checkpoint", MISSING, "--out", MISSING],
    "tools/evaluate.py": ["--samples", f"{MISSING}.npz", "--reference", MISSING, "--inception", f"{MISSING}.pt"],
    "tools/gpu_check.py": ["--steps", "0"],
    "tools/import_llamagen.py": [f"{MISSING}.pt", "--out", MISSING, "--image-size", "256"],
    "launchers/local.py": ["--config", f"{MISSING}.yaml", "--nproc", "2"],
    "launchers/slurm.py": ["--config", "configs/demo/dpar.yaml", "--nodes", "0", "--dry-run"],
}
CASES = [(e, "--help") for e in ENTRY_POINTS] + [(e, "bad argument" if e in BAD_ARGUMENTS else "unknown option")
                                                  for e in ENTRY_POINTS] + [("train.py", "unknown option")]


def arguments(entry: str, case: str) -> list[str]:
    return {"--help": ["--help"], "unknown option": ["--no-such-option"], "bad argument": BAD_ARGUMENTS.get(entry)}[case]


@pytest.fixture(scope="module")
def results():
    """(returncode, stdout, stderr, seconds) of every case, run two at a time."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}

    def run(case):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, case[0], *arguments(*case)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        return case, (done.returncode, done.stdout, done.stderr, time.perf_counter() - started)

    with ThreadPoolExecutor(max_workers=2) as pool:
        out = dict(pool.map(run, CASES))
    print("\nseconds to answer (--help / unknown option / bad argument):")
    for e in ENTRY_POINTS:
        print(f"  {e:<30}" + " ".join(f"{out[(e, c)][3]:6.2f}" for c in ("--help", "unknown option", "bad argument")
                                         if (e, c) in out))
    return out


def test_every_entry_point_is_found_and_has_a_bad_argument_case():
    assert "tools/extract_codes.py" in ENTRY_POINTS and "launchers/slurm.py" in ENTRY_POINTS
    assert set(BAD_ARGUMENTS) <= set(ENTRY_POINTS), "BAD_ARGUMENTS names an entry point that is gone"


@pytest.mark.parametrize("entry, case", CASES, ids=[f"{e}:{c}" for e, c in CASES])
def test_entry_point(results, entry, case):
    code, out, err, _ = results[(entry, case)]
    if case == "--help":
        assert code == 0 and "usage:" in out and err == "", err[-2000:]
        return
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert "Traceback" not in err
    if case == "unknown option":  # (or the required arguments it lacks, which argparse reports first)
        assert ("--no-such-option" in lines[0] or "required" in lines[0]) and "--help" in lines[0], lines[0]
    else:
        assert MISSING in lines[0] or "must be" in lines[0] or "unknown" in lines[0], lines[0]


def test_python_m_launch_without_a_command_is_one_line(capsys):
    from dpar_scale.launch.__main__ import main

    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: usage: python -m dpar_scale.launch deepspeed-hostfile") and err.count("\n") == 1
