"""`python -m dpar_scale.launch deepspeed-hostfile [PATH]`."""
from __future__ import annotations

import sys
from pathlib import Path

from dpar_scale.launch.slurm import LaunchError, deepspeed_hostfile


def main(argv=None) -> int:
    """`python -m dpar_scale.launch deepspeed-hostfile [PATH]`: the allocation's hostfile (stdout or PATH)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "deepspeed-hostfile":
        print(main.__doc__, file=sys.stderr)
        return 2
    try:
        text = deepspeed_hostfile()
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(argv) > 1:
        Path(argv[1]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

