"""The project's error base: every error a user causes and can fix derives from `DparError`.

ConfigError (a config or override), ShardError (code / side-array shards), CheckpointError, LaunchError,
ExtractError, NonFiniteLossError and the tools' own error classes all derive from it, and their messages say what
is wrong and how to fix it. The entry points (through dpar_scale/cli.py) print such an error as one line and exit
with status 2; any other exception is a bug and keeps its traceback.

The bottom of the package: imports nothing, so every room may import it.
"""


class DparError(Exception):
    """An error the user can fix (bad input, data, config or environment); the message names the fix.

    `shared`: every rank of a multi-process run raises the same error (the default: the checks agree across
    ranks before raising), so only rank 0 prints it. An error one rank may raise alone sets it False; then each
    rank that raises it prints it, naming its rank."""

    shared = True


class MissingFileError(DparError, FileNotFoundError):
    """A file or folder the user named (or a tool should have written) does not exist; the message says which
    and how to make it. Still a FileNotFoundError for callers that catch that."""
