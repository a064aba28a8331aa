"""Where the CLI writes: one rich console for results on stdout, and the one-line error format on stderr.

Results (tables, summaries) go through `console`; a failure a script should see is also one line
``rtrec: error: ...`` on stderr (`error_line`), the same format as the error boundary in errors.py.
"""

from __future__ import annotations

import sys

from rich.console import Console

console = Console()


def error_line(line: str) -> None:
    """One line on stderr (what went wrong), beside the normal output on stdout."""
    print(f"rtrec: error: {' '.join(line.split())}", file=sys.stderr, flush=True)
