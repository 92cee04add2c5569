"""Killing a process tree the way a lost node does (tests and tools/check_resume.py)."""
from __future__ import annotations

import os
import signal

# ------------------------------------------------------------------------------------------- hard kills
def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (read from /proc, Linux), parents first."""
    from pathlib import Path

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop(0))
        todo += children.get(tree[-1], [])
    return tree


def kill_process_tree(pid: int) -> None:
    """SIGKILL to `pid` and every descendant: what losing a node does to a job. (torchrun starts each worker in
    its own session, so killing torchrun's process group alone would leave the workers running.)"""
    for member in process_tree(pid):
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass

