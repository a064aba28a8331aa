"""The `rtrec` command line: the command table, in the order `rtrec --help` lists it.

Each command lives in the module of its group: stack_commands (up, down, status, demo),
data_commands (generate, produce, replay, catalog, rebuild-state), ops_commands (recommend,
similar, state, dlq, lag, quality), model_commands (train, eval, trainer, model ...) and bench_commands
(bench ...). Every command runs inside the error boundary of errors.py (`BoundaryTyper`); the
commands import their heavy dependencies when they run, so `rtrec --help` stays fast.
"""

from __future__ import annotations

from rtrec.workers.cli import data_commands, model_commands, ops_commands, stack_commands
from rtrec.workers.cli.bench_commands import bench_app
from rtrec.workers.cli.errors import BoundaryTyper

app = BoundaryTyper(
    add_completion=False,
    no_args_is_help=True,
    help="rtrec: streaming real-time recommender. Mistakes are one line on stderr (exit 2); "
    "--debug (anywhere) or RTREC_DEBUG=1 shows tracebacks.",
)
app.add_typer(bench_app, name="bench")
app.add_typer(model_commands.model_app, name="model")

app.command()(stack_commands.up)
app.command()(stack_commands.down)
app.command()(stack_commands.status)
app.command()(stack_commands.demo)
app.command()(data_commands.generate)
app.command()(data_commands.produce)
app.command()(data_commands.replay)
app.command()(ops_commands.recommend)
app.command()(ops_commands.similar)
app.command()(ops_commands.state)
app.command()(ops_commands.dlq)
app.command()(model_commands.train)
app.add_typer(model_commands.eval_app, name="eval")
app.command()(ops_commands.lag)
app.command("rebuild-state")(data_commands.rebuild_state)
app.command()(ops_commands.quality)
app.command()(model_commands.trainer)
app.command()(data_commands.catalog)


def main() -> None:
    """Run `rtrec` with the process's arguments (what the console script and `python -m` do)."""
    app()


__all__ = ["app", "main"]
