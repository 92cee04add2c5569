"""`python -m dpar_scale.launch deepspeed-hostfile [PATH]`."""
from __future__ import annotations

import sys
from pathlib import Path

from dpar_scale.cli import UsageError, entry_point
from dpar_scale.launch.slurm import deepspeed_hostfile


@entry_point
def main(argv=None) -> int:
    """`python -m dpar_scale.launch deepspeed-hostfile [PATH]`: the allocation's hostfile (stdout or PATH)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "deepspeed-hostfile":
        raise UsageError("usage: python -m dpar_scale.launch deepspeed-hostfile [PATH] (writes the Slurm "
                         "allocation's DeepSpeed hostfile to PATH or stdout)")
    text = deepspeed_hostfile()
    if len(argv) > 1:
        Path(argv[1]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

