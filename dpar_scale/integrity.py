"""File integrity: files checked against the sha256 their writer recorded (plus an optional content check), the
work split over ranks, and a per-user cache of files already verified so the next run does not re-hash them.

Used by data/ (code and side-array shards) and checkpoint/ (checkpoint files). Imports only the standard library:
callers say which share of the work is theirs (`WorkShare`: rank, world size and an all-gather), so this module
knows nothing of process groups.

The cache (`VerifiedCache`) lives under $DPAR_CACHE_DIR, else $XDG_CACHE_HOME/dpar_scale, else
~/.cache/dpar_scale (so read-only data folders work); one small JSON per data folder. An entry names a file by
absolute path, size, mtime and ctime (ctime cannot be set back by `touch`), the sha256 it matched and the content
checks it passed; any change to the file changes one of them and the file is checked again. A file modified less
than `RACY_SECONDS` before it was checked is not cached (its timestamp might not move on a second write in the
same clock tick). A cache that cannot be read or written is ignored: it only saves time.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

RACY_SECONDS = 2.0


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class WorkShare:
    """This process's share of a list of files: rank r of `world` checks items r, r + world, ...;
    `all_gather(obj)` returns every rank's obj in rank order (needed when world > 1)."""
    rank: int = 0
    world: int = 1
    all_gather: Callable[[Any], list] | None = None

    def mine(self, items: list) -> list:
        return items[self.rank::self.world]

    def gather(self, obj: Any) -> list:
        if self.world == 1:
            return [obj]
        if self.all_gather is None:
            raise ValueError(f"WorkShare(world={self.world}) needs an all_gather to combine the ranks' verdicts")
        return self.all_gather(obj)


@dataclass
class FileCheck:
    """One file to check. `sha256`: the recorded checksum (None: do not hash). `validate(path)`: a content check
    returning a problem (str) or None; `tag` names what it checks (e.g. "codes<512"), so a cached verdict is reused
    only for the same check. `what` / `fix` word the checksum-mismatch message."""
    path: str
    sha256: str | None = None
    validate: Callable[[str], str | None] | None = None
    tag: str = ""
    what: str = "file"
    fix: str = ""


def _mismatch(check: FileCheck) -> str:
    text = (f"{check.what} {check.path} does not match the sha256 recorded when it was written: it is corrupt (a "
            f"disk or copy error, or an edit, changed its bytes)")
    return f"{text}; {check.fix}" if check.fix else text


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def check_files(checks: list[FileCheck], share: WorkShare = WorkShare(), cache: "VerifiedCache | None" = None,
                progress: Callable[[int], None] | None = None) -> list[str]:
    """Problems found (one per bad file, in the order of `checks`), the same list on every rank.

    Each rank checks its share (skipping files the cache vouches for); with share.world > 1 this is a collective:
    every rank must call it with the same `checks`. Rank 0 records newly verified files in the cache.
    `progress(bytes)` is called after each file read."""
    problems: dict[int, str] = {}
    verified: dict[str, dict] = {}
    for i in share.mine(list(range(len(checks)))):
        check = checks[i]
        if cache is not None and cache.vouches(check):
            continue
        try:
            st = os.stat(check.path)  # before reading: a write during the check makes the entry stale
            if check.sha256 is not None and sha256_file(check.path) != check.sha256:
                problems[i] = _mismatch(check)
            elif check.validate is not None and (problem := check.validate(check.path)):
                problems[i] = problem
            elif time.time() - st.st_mtime > RACY_SECONDS:
                verified[os.path.abspath(check.path)] = {"stat": _stat_key(st), "sha256": check.sha256,
                                                         "tags": [check.tag] if check.tag else []}
        except OSError as e:
            problems[i] = f"{check.what} {check.path} cannot be read ({e.strerror or e})"
            continue
        if progress is not None:
            progress(st.st_size)
    for rank_problems, rank_verified in share.gather((problems, verified)):
        problems.update(rank_problems)
        verified.update(rank_verified)
    if cache is not None and verified and share.rank == 0:
        cache.record(verified)
    return [problems[i] for i in sorted(problems)]


def cache_dir() -> str:
    if os.environ.get("DPAR_CACHE_DIR"):
        return os.environ["DPAR_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dpar_scale")


class VerifiedCache:
    """Files of one folder already verified (see the module docstring); `vouches(check)` / `record(entries)`."""

    def __init__(self, folder: str):
        folder = os.path.abspath(folder)
        name = hashlib.sha256(folder.encode()).hexdigest()[:24]
        self.path = os.path.join(cache_dir(), "verified", f"{name}.json")
        self.folder = folder
        try:
            with open(self.path) as f:
                data = json.load(f)
            self.files = data["files"] if data.get("folder") == folder else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.files = {}

    def vouches(self, check: FileCheck) -> bool:
        entry = self.files.get(os.path.abspath(check.path))
        if not isinstance(entry, dict):
            return False
        try:
            st = os.stat(check.path)
        except OSError:
            return False
        return (entry.get("stat") == _stat_key(st) and (check.sha256 is None or entry.get("sha256") == check.sha256)
                and (not check.tag or check.tag in entry.get("tags", [])))

    def record(self, entries: dict[str, dict]) -> None:
        for path, entry in entries.items():
            old = self.files.get(path)
            if isinstance(old, dict) and old.get("stat") == entry["stat"]:  # same file: keep the checks it passed
                entry = {"stat": entry["stat"], "sha256": entry["sha256"] or old.get("sha256"),
                         "tags": sorted(set(old.get("tags", [])) | set(entry["tags"]))}
            self.files[path] = entry
        tmp = f"{self.path}.tmp.{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(tmp, "w") as f:
                json.dump({"folder": self.folder, "files": self.files}, f)
            os.replace(tmp, self.path)
        except OSError:  # a read-only home or a full disk: the cache only saves time
            try:
                os.remove(tmp)
            except OSError:
                pass
