"""Train-and-save and train-and-evaluate, shared by the CLI, the demo and the benches."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from rtrec.model.checkpoint import Checkpoint, save_checkpoint
from rtrec.model.datasets import (Split, TrainingInputError, leave_one_out, prepare_training_events,  # noqa: F401
                            resolve_source)
from rtrec.model.generator import TorchGenerator, resolve_device
from rtrec.model.sequence_model import build_model
from rtrec.model.train import TrainReport, ValidationCase, seed_everything, train_model, user_histories, vocab_for
from rtrec.stream.settings import Settings


def model_meta(settings: Settings) -> dict[str, Any]:
    """What serving needs besides the weights: how histories become tokens."""
    return {"family": settings.model_family, "layout": settings.model_layout,
            "max_events": settings.model_max_events}


def _cases(split: Split, users: Sequence[str], valid: bool) -> list[ValidationCase]:
    out = []
    for u in users:
        hist = split.valid_history(u) if valid else split.history(u)
        target = split.valid_target(u) if valid else split.target(u)
        out.append(ValidationCase([(e["item_id"], e["type"]) for e in hist], target,
                                  frozenset(e["item_id"] for e in hist)))
    return out


def family_settings(settings: Settings) -> Settings:
    """Per-family adjustments: T5 pays one encoder pass per target, so it reads shorter histories."""
    if settings.model_family == "t5":
        return settings.model_copy(update={"model_max_events": settings.t5_max_events})
    return settings


def train_generator(settings: Settings, split: Split, progress: bool = True,
                    refit_events: Sequence[dict] | None = None) -> tuple[TorchGenerator, TrainReport]:
    """Train on all but each user's last two events, early-stop on the second-to-last.

    With `train_refit` a fresh model is then trained for the best epoch count on
    `refit_events` (default: all but each user's last event, i.e. the validation
    events join the training data): early stopping only chose how long to train.
    Measured on ML-100K (HR@10, seeds 0/1/2): see the README's evaluation section.
    """
    settings = family_settings(settings)
    device = resolve_device(settings.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    vocab = vocab_for(user_histories(split.events).values(), settings)
    seed_everything(settings.train_seed)  # weight initialisation too, so a run is reproducible
    model = build_model(settings, vocab)
    report = train_model(model, vocab, list(user_histories(split.fit_events).values()), settings, device,
                         validation=_cases(split, split.test_users, valid=True), progress=progress)
    if settings.train_refit and report.best_epoch:
        started = time.monotonic()
        refit = list(user_histories(split.train_events if refit_events is None else refit_events).values())
        if progress:
            tqdm.write(f"refit: a fresh model on {len(refit):,} sequences for {report.best_epoch} epochs")
        seed_everything(settings.train_seed)
        model = build_model(settings, vocab)
        train_model(model, vocab, refit, settings, device, epochs=report.best_epoch, progress=progress)
        report.refit_seconds = time.monotonic() - started
    manifest = {"version": f"{settings.model_family}-{settings.model_layout}", "meta": model_meta(settings)}
    return TorchGenerator(Checkpoint(model, vocab, manifest, Path(".")), device), report


def train_checkpoint(settings: Settings, events: list[dict], root: Path,
                     progress: bool = True) -> tuple[Path, TrainReport]:
    """Train on an event log and save a versioned checkpoint.

    Early stopping trains on all but each user's last two events and validates on the
    second-to-last; the refit (if on) then trains on every event, the last ones included.
    """
    split = leave_one_out(events)
    started = time.monotonic()
    generator, report = train_generator(settings, split, progress, refit_events=split.events)
    ck = generator.checkpoint
    window = {"events": len(events), "first_ts": events[0]["ts"] if events else None,
              "last_ts": events[-1]["ts"] if events else None, "users": len(split.test_users)}
    metrics = {k: v for k, v in report.best.items() if k.startswith(("HR", "NDCG"))}
    metrics.update(train_seconds=round(time.monotonic() - started, 1), best_epoch=report.best_epoch)
    path = save_checkpoint(ck.model, ck.vocab, root, ck.manifest["meta"], metrics=metrics, training_window=window)
    return path, report


def plot_training(reports: dict[str, TrainReport], path: Path) -> Path:
    """Loss and validation NDCG@10 per epoch, one line per model, each model's best epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    for name, report in reports.items():
        epochs = [r["epoch"] for r in report.history]
        (line,) = ax_loss.plot(epochs, [r["loss"] for r in report.history], label=name)
        if report.history and "NDCG@10" in report.history[0]:
            ax_val.plot(epochs, [r["NDCG@10"] for r in report.history], label=name, color=line.get_color())
        best = report.best_epoch
        if 1 <= best <= len(report.history):
            row = report.history[best - 1]
            for ax, key in ((ax_loss, "loss"), (ax_val, "NDCG@10")):
                if key in row:
                    ax.axvline(best, color=line.get_color(), linestyle=":", linewidth=1)
                    ax.plot([best], [row[key]], marker="*", markersize=12, color=line.get_color(),
                            linestyle="none", label=f"{name}: best epoch {best}" if key == "NDCG@10" else None)
    ax_loss.set(title="Training loss (lower is better)", xlabel="epoch", ylabel="cross-entropy loss (nats)")
    ax_val.set(title="Validation NDCG@10 (higher is better)", xlabel="epoch",
               ylabel="NDCG@10 (0-1)")
    fig.suptitle("Next-item model training: loss and validation accuracy per epoch (dotted: best epoch)")
    for ax in (ax_loss, ax_val):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_eval(settings: Settings, source: str, families: Sequence[str], out_dir: Path, console: Any,
             baselines: bool = True, events: list[dict] | None = None) -> list[dict[str, Any]]:
    """Leave-one-out table: generative families vs blending, popularity and river BiasedMF.

    `source` is an event file in rtrec's format or a MovieLens file/folder, or the
    name of a dataset in ../shared/data (ml-100k, ml-1m-partial).
    """
    import tempfile

    from rtrec.model.blending import BlendingRecommender
    from rtrec.model.datasets import load_events
    from rtrec.model.fusion import RankFusion
    from rtrec.model.evaluate import (BiasedMFRecommender, PopularityRecommender, build_states, evaluate,
                                print_table, published_reference, write_report)
    from rtrec.stream.connections import redis_client
    from rtrec.stream.embedded import start_redis

    import json

    path = resolve_source(source)
    if events is None:  # (the CLI loads and checks them before importing this module)
        events = prepare_training_events(load_events(path), settings, path)  # before anything long starts
    split = leave_one_out(events)
    console.print(f"{path}: {len(events):,} events, {len(split.test_users):,} test users, {len(split.items):,} items")
    title = f"eval {path.stem if path.is_file() else path.name}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # every recommender ranks from the same states, built by the real store in a real Redis (first: the cheap
    # steps that can fail on the input run before any training)
    state_settings = settings.model_copy(update={"sequence_length": max(settings.sequence_length, settings.model_max_events)})
    with tempfile.TemporaryDirectory(prefix="rtrec-eval-") as tmp:
        server, url = start_redis(settings, Path(tmp))
        try:
            client = redis_client(settings.model_copy(update={"redis_url": url}))
            states = build_states(split, state_settings, client)
        finally:
            server.stop()
    rows: list[dict[str, Any]] = []
    blending = BlendingRecommender(settings)
    if baselines:
        rows += evaluate({"blending": blending, "popularity": PopularityRecommender(split),
                          "river-BiasedMF": BiasedMFRecommender(split)}, states, split)
        write_report(rows, out_dir, title)  # results so far are on disk before any training

    reports, train_seconds = {}, {}
    for family in families:
        fs = settings.model_copy(update={"model_family": family})
        started = time.monotonic()
        name = f"generative-{family}"
        generator, reports[family] = train_generator(fs, split)
        train_seconds[name] = time.monotonic() - started
        refit = f" (refit {reports[family].refit_seconds:.0f}s)" if reports[family].refit_seconds else ""
        console.print(f"{name}: trained in {train_seconds[name]:.0f}s{refit}, best epoch {reports[family].best_epoch}")
        family_recs: dict[str, Any] = {name: generator}
        if baselines and settings.serve_blend_weight:  # the fused ranking the worker serves
            family_recs[f"{name}+blending"] = RankFusion([(generator, 1.0), (blending, settings.serve_blend_weight)])
        family_rows = evaluate(family_recs, states, split)
        for row in family_rows:
            row["train_seconds"] = round(train_seconds.get(row["name"], 0.0), 1)
        rows += family_rows
        (out_dir / f"{name}.json").write_text(json.dumps(
            {"family": family, "best_epoch": reports[family].best_epoch, "validation": reports[family].best,
             "test": family_rows, "train_seconds": round(train_seconds[name], 1)}, indent=2, default=float))
        write_report(rows, out_dir, title)  # each family's results are kept before the next one trains

    order = ([f"generative-{f}" for f in families] + ["blending", "popularity", "river-BiasedMF"]
             + [f"generative-{f}+blending" for f in families])
    rows.sort(key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    for row in rows:
        row.setdefault("train_seconds", 0.0)
    csv_path, png_path = write_report(rows, out_dir, title)
    curves = plot_training({f: r for f, r in reports.items()}, out_dir / "training-curves.png") if reports else None
    print_table(rows, console, published_reference() if "ml-1m" in str(path) else None)
    console.print(f"table: {csv_path}  chart: {png_path}" + (f"  curves: {curves}" if curves else ""))
    return rows
