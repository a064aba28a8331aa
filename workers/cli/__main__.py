"""`python -m rtrec.workers.cli`: the same as the `rtrec` console script."""

from rtrec.workers.cli import main

main()
