"""Stopping a run cleanly when the scheduler says so: preemption (SIGTERM) or the time-limit warning (USR2, or
whatever `--signal` / SUBMITIT_PREEMPT_SIGNAL names).

The handler only records the signal and asks the trainer to stop (`Trainer.request_stop`); at the next step
boundary every rank agrees, saves one checkpoint and `fit` returns with `preempted: True`. A signal that arrives
while the trainer is still being built is remembered and passed on once it exists. Used by `train.py` (plain
python / torchrun, which forwards SIGTERM to every worker) and by the submitit job (`dpar_scale.launch.job`).
"""
from __future__ import annotations

import signal
import sys


class StopOnSignals:
    """Installs the handlers on construction (main thread only); `restore()` puts the previous ones back and
    returns them, keyed by signal."""

    def __init__(self, signals, reason: str = "checkpoint"):
        self.caught: list[signal.Signals] = []
        self.reason = reason
        self._trainer = None
        self._previous = {signal.Signals(s): signal.signal(s, self._on_signal) for s in dict.fromkeys(signals)}

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        print(f"dpar-scale: caught {name}; stopping at the next step boundary to {self.reason}", file=sys.stderr,
              flush=True)
        self.caught.append(signal.Signals(signum))
        if self._trainer is not None:
            self._trainer.request_stop()

    def attach(self, trainer) -> None:
        """From now on a signal stops `trainer`; one caught before this stops it right away."""
        self._trainer = trainer
        if self.caught:
            trainer.request_stop()

    def restore(self) -> dict:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._trainer = None
        return dict(self._previous)
