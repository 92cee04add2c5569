"""metrics.jsonl and wandb after a resume from an older checkpoint: one row per step, the lost attempt's rows kept
aside, and the wandb run rewound (same folder) or forked (another folder) at the checkpoint's step.

wandb runs offline here; its run files (`<run>/wandb/offline-run-*/run-<id>.wandb`) are read back directly:
records in wandb's log format (7-byte header, 32 KiB blocks, each record with a 7-byte header and possibly split
across blocks), each a `wandb_internal_pb2.Record` protobuf."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from dpar_scale.config import load_config
from dpar_scale.train.metrics_log import SUPERSEDED_FILE, MetricsLogger, read_metrics
from dpar_scale.train.trainer import Trainer

from parallel_helpers import overrides


def wandb_file_records(path: Path):
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of a split one
            yield parts
            parts = b""


def offline_runs(run_dir: Path, timeout: float = 60) -> list[dict]:
    """Every offline wandb run written under `run_dir`, oldest first: id, branch point, logged steps. wandb's
    service writes these files in the background and may still be at it after `finish()` returns (seen on a busy
    machine): wait until every file ends with its exit record."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        runs = [_read_offline_run(path) for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))]
        if all(run["complete"] for run in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)


def _read_offline_run(path: Path) -> dict:
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    found = {"id": None, "branch_point": None, "steps": [], "complete": False}
    try:
        for raw in wandb_file_records(path):
            record = pb.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                found["id"] = record.run.run_id
                for item in record.run.config.update:
                    if item.key == "_wandb":
                        found["branch_point"] = json.loads(item.value_json).get("branch_point")
            elif kind == "history":
                found["steps"] += [int(i.value_json) for i in record.history.item
                                   if (i.key or "/".join(i.nested_key)) == "_step"]
            elif kind == "exit":
                found["complete"] = True
    except (DecodeError, struct.error):  # a record still being written
        found["complete"] = False
    return found


@pytest.fixture
def wandb_offline(monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)


def cfg(out, codes, *extra):
    return load_config(None, overrides(out, codes, "gpt", "train.steps=6", "checkpoint.interval=2",
                                       "checkpoint.keep_last=0", "wandb.enabled=true", "wandb.mode=offline",
                                       *extra))


def train_rows(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def test_resume_from_an_older_checkpoint_rewrites_metrics_and_rewinds_wandb(tmp_path, code_dataset, wandb_offline):
    run = tmp_path / "run"
    Trainer(cfg(run, code_dataset)).fit()
    first = {r["step"]: r for r in train_rows(run)}
    # the run is lost after step 6 except for the checkpoint of step 2: resume there (same run folder)
    Trainer(cfg(run, code_dataset, f"checkpoint.resume={run / 'checkpoints' / 'step-000002'}")).fit()
    rows = train_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # one row per step
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r] == [6]
    assert [r["loss"] for r in rows] == [first[s]["loss"] for s in range(1, 7)]  # resume is exact in one process
    superseded = read_metrics(run / SUPERSEDED_FILE)
    assert sorted(r["step"] for r in superseded if "loss" in r) == [3, 4, 5, 6]
    assert all(r["superseded_at_resume_from"] == 2 for r in superseded)
    # wandb: the same run, rewound to step 2 (history cut after 2), then steps 3..6 again
    runs = offline_runs(run)
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"]
    assert runs[0]["steps"] == [1, 2, 3, 4, 5, 6] and runs[0]["branch_point"] is None
    assert runs[1]["branch_point"] == {"run_id": runs[0]["id"], "step": 2}
    assert runs[1]["steps"] == [3, 4, 5, 6]
    # continuing from the newest checkpoint supersedes nothing: a plain resume of the same wandb run
    Trainer(cfg(run, code_dataset, "train.steps=8", "checkpoint.resume=auto")).fit()
    assert [r["step"] for r in train_rows(run)] == list(range(1, 9))
    third = offline_runs(run)[2]
    assert third["id"] == runs[0]["id"] and third["branch_point"] is None and third["steps"] == [7, 8]


def test_checkpoint_of_another_run_folder_forks_its_wandb_run(tmp_path, code_dataset, wandb_offline):
    source = tmp_path / "source"
    Trainer(cfg(source, code_dataset, "train.steps=4")).fit()
    other = tmp_path / "other"
    trainer = Trainer(cfg(other, code_dataset, f"checkpoint.resume={source / 'checkpoints' / 'step-000002'}"))
    trainer.fit()
    origin = offline_runs(source)[0]["id"]
    fork = offline_runs(other)
    assert len(fork) == 1 and fork[0]["id"] != origin and trainer.state.wandb_id == fork[0]["id"]
    assert fork[0]["branch_point"] == {"run_id": origin, "step": 2} and fork[0]["steps"] == [3, 4, 5, 6]
    assert [r["step"] for r in train_rows(other)] == [3, 4, 5, 6]
    assert not (other / SUPERSEDED_FILE).exists()


def test_a_wandb_server_that_refuses_rewinding_gets_a_plain_resume(tmp_path, capsys, monkeypatch):
    """Rewind (resume_from) is a preview feature some servers refuse: the same run is resumed instead, said in the
    log, and the resumed-from step is recorded in its config."""
    import wandb

    calls = []

    class Run:
        config = type("Config", (), {"update": lambda self, values, allow_val_change: calls.append(values)})()

    def init(**kwargs):
        calls.append({k: kwargs.get(k) for k in ("id", "resume", "resume_from", "fork_from")})
        if kwargs.get("resume_from"):
            raise wandb.errors.CommError("rewinding is not enabled for this entity")
        return Run()

    monkeypatch.setattr(wandb, "init", init)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    wandb_cfg = load_config(None, ["wandb.mode=offline"]).wandb
    logger = MetricsLogger(tmp_path, wandb_cfg=wandb_cfg, wandb_id="abc", resumed_step=2, own_run=True)
    assert calls == [{"id": "abc", "resume": None, "resume_from": "abc?_step=2", "fork_from": None},
                     {"id": "abc", "resume": "allow", "resume_from": None, "fork_from": None},
                     {"resumed_from_step": 2}]
    assert logger.superseded == 1 and [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert "wandb refused" in capsys.readouterr().err
