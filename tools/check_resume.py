#!/usr/bin/env python
"""Kill a multi-process training run with SIGKILL at a random step, resume it on other process counts, and compare
each continuation with an uninterrupted run: same sample ids, losses, final loss.

    python tools/check_resume.py --config configs/demo/gpt.yaml [--nproc 2] [--resume-on 1,4] [--steps 40] \
        [--interval 10] [--kill-step K] [--out runs/check_resume] [--json result.json] [dotted overrides ...]

Runs, with the README's commands (train.py, under torchrun when more than one process):
  straight   --nproc processes, --steps steps, a checkpoint every --interval steps
  killed     the same run, SIGKILLed (torchrun and every worker) once metrics.jsonl reaches step K (random in
             [interval + 2, steps - 5] unless --kill-step); the kill may land inside a save
  on-N       a copy of the killed run folder resumed with checkpoint.resume=auto on N processes (FSDP2 over N)
A resume passes when it consumes exactly the uninterrupted run's sample ids and every logged loss is within
--rtol (fp32 reduction order differs between process counts). Exit status 1 when one does not. Prints a table
and, with --json, writes it.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpar_scale.cli import UsageError, entry_point, existing_file, parser, positive_float, positive_int  # noqa: E402



def train_command(nproc: int, out: Path, args, *extra: str) -> list[str]:
    from dpar_scale.launch import free_port

    launch = [sys.executable, "train.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "train.py"]
    return [*launch, "--config", args.config, f"train.steps={args.steps}", f"checkpoint.interval={args.interval}",
            "checkpoint.keep_last=0", "data.log_sample_ids=true", "train.log_every=1", "train.progress_bar=false",
            "parallel.dp_shard=-1", f"run.output_dir={out}", *args.overrides, *extra]


def logged_steps(out: Path) -> dict[int, dict]:
    path = out / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.is_file() else []  # complete lines only
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def run(cmd: list[str], what: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout + done.stderr


@entry_point
def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--config", required=True, type=existing_file)
    ap.add_argument("--nproc", type=positive_int, default=2, help="processes of the run that is killed")
    ap.add_argument("--resume-on", default="1,4", help="comma-separated process counts to resume on")
    ap.add_argument("--steps", type=positive_int, default=40)
    ap.add_argument("--interval", type=positive_int, default=10)
    ap.add_argument("--kill-step", type=int, default=0, help="default: random")
    ap.add_argument("--rtol", type=positive_float, default=1e-5)
    ap.add_argument("--out", default="runs/check_resume")
    ap.add_argument("--json", default="")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = ap.parse_args(argv)
    if args.steps < args.interval + 7:
        raise UsageError("--steps must leave room for a checkpoint and a kill before the end (>= interval + 7)")
    from dpar_scale.launch import kill_process_tree
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    t0 = time.perf_counter()
    run(train_command(args.nproc, out / "straight", args), "the uninterrupted run")
    straight_s = time.perf_counter() - t0
    reference = logged_steps(out / "straight")

    kill_step = args.kill_step or random.randint(args.interval + 2, args.steps - 5)
    proc = subprocess.Popen(train_command(args.nproc, out / "killed", args), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    while max(logged_steps(out / "killed"), default=0) < kill_step:
        if proc.poll() is not None:
            raise SystemExit(f"the run to kill ended (exit {proc.returncode}) before step {kill_step}")
        time.sleep(0.01)
    kill_process_tree(proc.pid)
    proc.wait()
    killed_at = max(logged_steps(out / "killed"))
    left = sorted(p.name for p in (out / "killed" / "checkpoints").iterdir())
    print(f"uninterrupted run: {args.steps} steps on {args.nproc} processes in {straight_s:.0f} s")
    print(f"SIGKILL after step {killed_at} (target {kill_step}); checkpoint folders left: {', '.join(left)}")

    rows, ok = [], True
    for nproc in [int(n) for n in args.resume_on.split(",")]:
        folder = out / f"on-{nproc}"
        shutil.copytree(out / "killed", folder)
        (folder / "metrics.jsonl").unlink()  # compare only what the resumed run logs
        log = run(train_command(nproc, folder, args, "checkpoint.resume=auto"), f"the resume on {nproc}")
        resumed = next((line for line in log.splitlines() if line.startswith("resumed from")), "")
        got = logged_steps(folder)
        same_ids = all(got[s].get("sample_ids") == reference[s].get("sample_ids") for s in got)
        worst = max(abs(got[s]["loss"] - reference[s]["loss"]) / abs(reference[s]["loss"]) for s in got)
        passed = same_ids and worst <= args.rtol and max(got) == args.steps
        ok &= passed
        rows.append({"resume_on": nproc, "from_step": min(got) - 1, "steps_compared": len(got),
                     "same_sample_ids": same_ids, "max_rel_loss_diff": worst,
                     "final_loss": got[args.steps]["loss"], "final_loss_uninterrupted": reference[args.steps]["loss"],
                     "passed": passed, "log": resumed})
    print("| resumed on | from step | steps compared | same sample ids | max rel. loss diff | final loss | "
          "uninterrupted | pass |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['resume_on']} | {r['from_step']} | {r['steps_compared']} | {r['same_sample_ids']} | "
              f"{r['max_rel_loss_diff']:.1e} | {r['final_loss']:.5f} | {r['final_loss_uninterrupted']:.5f} | "
              f"{'yes' if r['passed'] else 'NO'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "nproc": args.nproc, "steps": args.steps,
                                               "interval": args.interval, "killed_after_step": killed_at,
                                               "checkpoint_folders_left": left, "overrides": args.overrides,
                                               "resumes": rows}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
