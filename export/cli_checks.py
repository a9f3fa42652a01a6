"""Argument checks shared by the `python -m export evaluate` commands: fail at once, with a message,
instead of with a traceback after minutes of work."""

from __future__ import annotations

import sys
from pathlib import Path

DATA_HINT = "pass the datasets root (holding sartaj-classification/, br35h-polygons/, ruslan-kl-polygons/) with --data or BRAINSCAN_DATA"


def argument_problem(*, data: Path, output: Path | None = None, errors_dir: Path | None = None, limit: int = 0) -> str | None:
    """What is wrong with these arguments, or None."""
    if not Path(data).is_dir():
        return f"datasets folder {data} not found; {DATA_HINT}"
    if limit < 0:
        return f"--limit must be 0 (all) or a positive count, not {limit}"
    if output is not None and Path(output).is_dir():
        return f"output {output} is a folder; give a file name"
    if errors_dir is not None and Path(errors_dir).exists() and not Path(errors_dir).is_dir():
        return f"--errors {errors_dir} is a file; give a folder"
    return None


def fail(prog: str, message: str) -> int:
    """Print `prog: message` to stderr; the exit status of a usage error."""
    print(f"{prog}: {message}", file=sys.stderr)
    return 2
