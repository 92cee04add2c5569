"""The demos' stage runner (dpar_scale/launch/stages.py): stages side by side really run at the same time, with the
cores split between them, every line of output kept and named, and a failure stopping the others."""
import os
import time

import pytest

from dpar_scale.launch.stages import Stages

# Each child announces itself with a file, then waits for its partner's: run one after the other, the first would
# wait forever (here: fail after 60 s).
MEET = """
import os, sys, time
me, partner = sys.argv[1], sys.argv[2]
open(me, "w").close()
deadline = time.time() + 60
while not os.path.exists(partner):
    if time.time() > deadline:
        sys.exit("partner never started")
    time.sleep(0.05)
print("met", os.path.basename(partner), "threads", os.environ.get("OMP_NUM_THREADS"), flush=True)
"""


def test_stages_run_together_at_the_same_time_with_the_cores_split(tmp_path):
    stages = Stages(tmp_path / "demo.log", cwd=tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    stages.run_together({"first": ["-c", MEET, a, b], "second": ["-c", MEET, b, a]})
    log = (tmp_path / "demo.log").read_text()
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // 2)
    assert f"[first] met b threads {threads}" in log and f"[second] met a threads {threads}" in log
    assert set(stages.seconds) == {"first", "second"}


def test_a_failing_stage_stops_the_others_and_is_named(tmp_path):
    stages = Stages(tmp_path / "demo.log", cwd=tmp_path)
    started = time.perf_counter()
    with pytest.raises(SystemExit, match=r"demo stage\(s\) broken failed \(exit 3\)"):
        stages.run_together({"broken": ["-c", "print('about to fail', flush=True); raise SystemExit(3)"],
                             "slow": ["-c", "import time; time.sleep(120)"]})
    assert time.perf_counter() - started < 60  # the slow stage was stopped, not waited for
    assert "[broken] about to fail" in (tmp_path / "demo.log").read_text()
