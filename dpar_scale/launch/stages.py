"""A pipeline of the project's own tools run one after another as subprocesses (the demos): each stage's output
streams to the console and to a log file, a failing stage stops the pipeline naming its command and the log, and
every stage is timed."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


class Stages:
    def __init__(self, log: Path, cwd: Path):
        self.log, self.cwd, self.seconds = log, cwd, {}

    def run(self, stage: str, args: list) -> None:
        """Runs `python ARGS…` in the repository as stage `stage` (its seconds add up under that name)."""
        args = [str(a) for a in args]
        line = f"\n$ {' '.join(args)}"
        print(line, flush=True)
        started = time.perf_counter()
        with self.log.open("a") as f:
            f.write(line + "\n")
            f.flush()
            proc = subprocess.Popen([sys.executable, *args], cwd=self.cwd, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            # Pass output through in raw chunks so progress bars keep redrawing in place ('\r').
            while chunk := proc.stdout.read1(65536):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                f.write(chunk.decode(errors="replace"))
            if proc.wait() != 0:
                raise SystemExit(f"demo stage {stage} failed (exit {proc.returncode}): {' '.join(args)}; "
                                 f"see {self.log}")
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - started, 1)
