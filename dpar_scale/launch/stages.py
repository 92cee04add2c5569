"""A pipeline of the project's own tools run as subprocesses (the demos): each stage's output streams to the console
and to a log file, a failing stage stops the pipeline naming its command and the log, and every stage is timed.
Independent stages can run side by side (`run_together`), the machine's cores split between them."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
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
        self._add_seconds(stage, started)

    def run_together(self, stages: dict[str, list]) -> None:
        """Runs each `python ARGS…` of {stage: ARGS} at the same time, the cores this process may use split evenly
        between them (OMP_NUM_THREADS), each line of output prefixed with its stage's name. Two small models
        training side by side on a thread each finish sooner than one after the other on two threads each (the
        demo's: see README), because at their sizes a second thread speeds a step up by far less than 2x."""
        if len(stages) <= 1:
            for stage, args in stages.items():
                self.run(stage, args)
            return
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // len(stages)))}
        lock, started, procs = threading.Lock(), time.perf_counter(), {}
        with self.log.open("a") as f:
            def emit(text: str) -> None:
                with lock:
                    print(text, flush=True)
                    f.write(text + "\n")
                    f.flush()

            def relay(stage: str, proc: subprocess.Popen) -> None:
                for raw in proc.stdout:  # whole lines: progress bars are off in these stages' commands
                    emit(f"[{stage}] {raw.decode(errors='replace').rstrip()}")
                proc.wait()
                with lock:
                    self._add_seconds(stage, started)
                    if proc.returncode != 0:  # the others' minutes would be spent on a pipeline that stops
                        for other in procs.values():
                            if other.poll() is None:
                                other.terminate()

            for stage, args in stages.items():
                args = [str(a) for a in args]
                emit(f"\n$ [{stage}, {env['OMP_NUM_THREADS']} thread(s), beside the others] {' '.join(args)}")
                procs[stage] = subprocess.Popen([sys.executable, *args], cwd=self.cwd, env=env,
                                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            relays = [threading.Thread(target=relay, args=item, daemon=True) for item in procs.items()]
            for t in relays:
                t.start()
            for t in relays:
                t.join()
        failed = [stage for stage, proc in procs.items() if proc.returncode not in (0, -15)] or \
            [stage for stage, proc in procs.items() if proc.returncode != 0]
        if failed:
            raise SystemExit(f"demo stage(s) {', '.join(failed)} failed (exit "
                             f"{', '.join(str(procs[s].returncode) for s in failed)}); see {self.log}")

    def _add_seconds(self, stage: str, started: float) -> None:
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - started, 1)
