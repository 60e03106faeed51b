"""The sequential editing protocol, the same loop for every method.

Edit T requests in turns of ``turn_size``; after each turn score that turn's requests ("post"); every
``diag_every`` edits log the stability diagnostics of each edited matrix; after the last turn score every
request on the final model ("after-post") and the general abilities (retention = after / before).
Results: ``sequential_report.json``, ``diagnostics.png`` and TensorBoard logs under the output folder.
"""

from __future__ import annotations

import functools
import json
import logging
import time
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from horse_pl.data.batch import EVAL_VIEWS, EditBatch, EditCollator, tokenize_requests
from horse_pl.data.records import EditRequest
from horse_pl.edit_modules import resolve_edit_modules
from horse_pl.editing.editor import Refinement
from horse_pl.editing.key_stats import DEFAULT_GENERAL_DATA
from horse_pl.metrics import SCORE_NAMES, compute_scores, score_batch, score_view
from horse_pl.models import load_model
from horse_pl.progress import track
from horse_pl.sequential.editors import FineTuneEditor, HorseTurnEditor, MoseEditor, stability
from horse_pl.sequential.general import DEFAULT_TASKS, GeneralCheck, perplexity_texts

log = logging.getLogger(__name__)
METHODS = ("mose", "ft", "horse", "horse_lifelong")


def _option(default, help: str, choices: tuple | None = None):
    """A setting that is also an ``edit.py sequential`` option (``--name-with-dashes``), with its help text (and
    the values it takes, where they are few)."""
    metadata = {"help": help, **({"choices": choices} if choices else {})}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# settings every method of a run shares: the requests' turns and scoring (and the methods themselves)
SHARED_SETTINGS = ("methods", "model", "turn_size", "curve_every", "post_views", "method_settings")


@dataclass
class SequentialConfig:
    """Settings of one sequential run (``edit.py sequential``; recipes in ``configs/sequential/``). The fields made
    with ``_option`` are that command's options; the general-ability and tokenisation settings are options shared
    with ``edit.py edit``."""

    methods: Sequence[str] = _option(("mose",), "sequential editors to run, each on a fresh base model; horse merges "
                                     "each turn's shifts, horse_lifelong's solves also keep earlier turns' keys")
    model: str = _option("embedded:smollm2-135m", "base model")
    edit_modules: str | list[str] = _option("layers:19-21", "edited layers (the MOSE paper's)")
    turn_size: int = _option(1, "requests edited per turn")
    diag_every: int = _option(10, "log stability diagnostics every N edits")
    steps: int = _option(20, "optimisation steps per turn for mose/ft")
    lr: float = _option(5e-4, "Adam learning rate for mose/ft")
    n_blocks: int = _option(4, "MOSE: blocks of the orthogonal matrix")
    radius_scale: float = _option(1e-5, "MOSE: ball radius = scale * n^2 / sqrt(blocks)")
    reference_block: int | None = _option(None, "MOSE: scale the ball to the block, radius = scale * n * REF / "
                                                "sqrt(blocks): the per-entry bound the released formula gives a block "
                                                "of REF (2752: LLaMA-2-7B in 4 blocks); default: the released formula")
    mose_optimizer: str = _option("adam", "MOSE: adam (released: every skew entry moves ~lr per step, so one request "
                                          "fills the ball) or sgd (steps stay in the request's key directions)",
                                  choices=("adam", "sgd"))
    mose_lr: float | None = _option(None, "MOSE: learning rate (default: --lr)")
    mose_target: float = _option(1.0, "MOSE: a request whose answer's geometric-mean probability reaches this stops "
                                      "pulling, and the turn stops when all have (1: every step runs)")
    mose_preserve: float = _option(0.0, "MOSE: weight of the relative mean squared change of the edited layers' "
                                        "outputs on unrelated text's keys (C0) since the unedited model")
    mose_keep_edits: float = _option(0.0, "MOSE: weight of the same relative change a turn causes on the keys of every "
                                          "earlier turn's edit prompts")
    norm_constraint: float | None = _option(5e-4, "ft: per-turn element-wise bound on the weight change, or none")
    editor: str | None = _option(None, "exported editor folder, for the horse and horse_lifelong methods")
    keep_edits: float = _option(1.0, "horse_lifelong: weight nu of earlier turns' keys K^T K in each solve")
    lifelong_preserve: float | None = _option(None, "horse_lifelong: weight mu of C0 (unrelated text's keys) in each "
                                                    "solve (None: the editor's)")
    preserve_facts: float | None = _option(None, "horse, horse_lifelong: weight mu_f of F (the keys at known facts' "
                                                 "answers) in each solve (None: the editor's)")
    preserve_facts_data: str | None = _option(None, "records file whose true facts give F (None: the one the editor "
                                                    "was trained with); keep the edited requests out of it")
    refine: int = _option(0, "horse, horse_lifelong: refine each turn's residuals by K Adam steps on its edit prompts' "
                             "loss through the turn's own solve (0: the hypernetwork's one step)")
    refine_lr: float = _option(0.1, "horse, horse_lifelong: Adam rate of --refine, relative to the RMS of each "
                                    "module's first residuals")
    refine_target: float = _option(1.0, "horse, horse_lifelong: a request whose answer reaches this probability stops "
                                        "pulling the residuals")
    refine_preserve: float = _option(0.0, "horse, horse_lifelong: weight of the mean squared output change on "
                                          "unrelated text's keys (C0) in the refined loss")
    refine_anchor: bool = _option(False, "horse, horse_lifelong: --refine-preserve charges the total shift since the "
                                         "unedited model (W - W0), not only each turn's: a turn pays for the drift "
                                         "it adds to the earlier turns' (an output-space norm anchor)")
    refresh_every: int = _option(0, "horse_lifelong: recompute C0 and the earlier turns' keys on the edited model "
                                    "every N turns, so later solves keep the outputs it has now (0: never)")
    refresh_c0_every: int | None = _option(None, "horse_lifelong: recompute C0 every N turns instead (default: with "
                                                 "the keys, every --refresh-every turns; 0: never); C0 moves slowly "
                                                 "and costs a pass over the preservation texts")
    post_views: Sequence[str] = _option(EVAL_VIEWS, "views scored right after each turn (the post scores); the final "
                                                    "scores and the curve always score every view", choices=EVAL_VIEWS)
    curve_every: int = _option(0, "every N edits also score every request edited so far and the general tasks "
                                  "retention counts (0: only at the end)")
    method_settings: dict = _option({}, "settings of one method alone, a mapping from method to its settings "
                                        "(YAML/JSON, e.g. '{mose: {edit_modules: layers:19-21, lr: 1e-3}}'); the "
                                        "rest are shared")
    seed: int = _option(0, "random seed")
    general_data: str | None = DEFAULT_GENERAL_DATA
    general_tasks: Sequence[str] = DEFAULT_TASKS
    general_limit: int | None = 200
    batch_size: int = 32
    max_length: int = 256
    dtype: str = "float32"
    device: str = "cpu"
    extra: dict = field(default_factory=dict)

    @property
    def refinement(self) -> Refinement:
        """The HORSE turns' refinement settings (no steps: none)."""
        return Refinement(self.refine, self.refine_lr, self.refine_target, self.refine_preserve)

    def for_method(self, method: str) -> SequentialConfig:
        """The settings ``method`` runs with: the shared ones, with its own from ``method_settings`` on top."""
        hints = typing.get_type_hints(SequentialConfig)
        own = {}
        for name, value in (self.method_settings.get(method) or {}).items():
            hint = hints[name]
            number = next((t for t in (float, int) if t in (hint, *typing.get_args(hint))), None)
            if value is not None and number is not None and not isinstance(value, bool):
                try:
                    value = number(value)  # YAML reads 1e-3 as a string
                except ValueError:
                    raise ValueError(f"--method-settings: '{name}' of '{method}' must be a number, not "
                                     f"{value!r}.") from None
            own[name] = value
        return replace(self, method_settings={}, **own)

    def check(self) -> None:
        """Refuse settings that cannot run, before any model is loaded."""
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"Unknown sequential method '{unknown[0]}'; choose from {METHODS}.")
        bad_views = [v for v in self.post_views if v not in EVAL_VIEWS]
        if bad_views:
            raise ValueError(f"--post-views has '{bad_views[0]}', which is not a view; choose from {EVAL_VIEWS}.")
        allowed = [f.name for f in fields(SequentialConfig) if "help" in f.metadata and f.name not in SHARED_SETTINGS]
        if not isinstance(self.method_settings, dict):
            raise ValueError(f"--method-settings must map methods to their settings, not {self.method_settings!r}.")
        for method, own in self.method_settings.items():
            if method not in METHODS:  # a known method outside --method: a recipe's settings, unused this run
                raise ValueError(f"--method-settings has settings for '{method}', which is not a sequential method; "
                                 f"choose from {METHODS}.")
            if not isinstance(own, dict):
                raise ValueError(f"--method-settings: '{method}' must map setting names to values, not {own!r}.")
            bad = [name for name in own if name not in allowed]
            if bad:
                raise ValueError(f"--method-settings: '{bad[0]}' of '{method}' is not a setting one method can have "
                                 f"alone; choose from {allowed}.")
        for option, value in (("--refresh-every", self.refresh_every), ("--refresh-c0-every", self.refresh_c0_every)):
            if value is not None and (value < 0 or (value and "horse_lifelong" not in self.methods)):
                raise ValueError(f"{option} {value} must be 0 or a number of turns, and applies to the "
                                 "horse_lifelong method only; add it to --methods or drop the option.")
        for method in self.methods:
            self.for_method(method)._check_method(method)

    def _check_method(self, method: str) -> None:
        """Refuse what ``method`` cannot run with (these are its settings: :meth:`for_method`)."""
        from horse_pl.export import EditorLoadError

        _ = self.refinement  # building the settings refuses bad ones
        if not method.startswith("horse"):
            return
        if self.refine_anchor and not (self.refine and self.refine_preserve):
            raise ValueError("--refine-anchor charges the refinement's output change on W - W0: it needs --refine K "
                             "and --refine-preserve > 0.")
        if not self.editor:
            raise EditorLoadError(f"The '{method}' sequential method needs --editor (a folder from "
                                  "'train.py export').")


def build_editor(method: str, model, cfg: SequentialConfig, names: list[str]):
    if method == "mose":
        moments = None
        if cfg.mose_preserve or cfg.mose_keep_edits:  # C0 of the unedited model, before the adapters go in
            from horse_pl.editing.key_stats import cached_key_moments
            from horse_pl.models import load_tokenizer

            moments = cached_key_moments(model, load_tokenizer(cfg.model), names,
                                         cfg.general_data or DEFAULT_GENERAL_DATA)
        lr = cfg.mose_lr if cfg.mose_lr is not None else cfg.lr
        return MoseEditor(model, names, cfg.n_blocks, cfg.steps, lr, cfg.radius_scale, cfg.reference_block,
                          cfg.mose_optimizer, cfg.mose_target, cfg.mose_preserve, cfg.mose_keep_edits, moments)
    if method == "ft":
        return FineTuneEditor(model, names, cfg.steps, cfg.lr, cfg.norm_constraint)
    if method in ("horse", "horse_lifelong"):
        from horse_pl.edit_modules import get_modules
        from horse_pl.editing.key_stats import (
            bind_preservation,
            cached_key_moments,
            key_second_moments,
            preservation_texts,
        )
        from horse_pl.export import EditorLoadError, load_editor
        from horse_pl.models import load_tokenizer, model_fingerprint

        editor, config = load_editor(cfg.editor)
        if model_fingerprint(model) != config.base_fingerprint:
            raise EditorLoadError(f"The editor '{cfg.editor}' was trained on '{config.base_model}', not on "
                                  f"'{cfg.model}'; pass the editor's base model with --model.")
        general_data = cfg.general_data or DEFAULT_GENERAL_DATA
        tokenizer = load_tokenizer(cfg.model)
        editor = editor.to(cfg.device)
        if cfg.preserve_facts is not None:
            if not hasattr(editor.update, "preserve_facts"):
                raise ValueError(f"--preserve-facts needs an editor with a closed-form solve; '{editor.update.name}' "
                                 "(MEND's outer product) has none.")
            editor.update.preserve_facts = cfg.preserve_facts
        update = editor.update
        if update.needs_key_moments or update.needs_fact_moments:
            # an editor with a preservation term needs its key moments on the unedited model (lifelong turns rebind
            # C0 with their own weight, the facts' F stays)
            bind_preservation(editor, model, tokenizer, config.edit_modules, general_data,
                              cfg.preserve_facts_data or config.training.get("preserve_facts_data"))
        refinement = cfg.refinement
        lifelong = method == "horse_lifelong"
        preserve = cfg.lifelong_preserve if cfg.lifelong_preserve is not None else getattr(editor.update, "preserve", 0)
        moments = (cached_key_moments(model, tokenizer, config.edit_modules, general_data)
                   if (lifelong and preserve) or (refinement and refinement.preserve) else None)
        modules = get_modules(model, config.edit_modules)
        preservation = functools.cache(lambda: preservation_texts(general_data))  # read once, when first needed
        heldout = functools.cache(lambda: perplexity_texts(general_data))

        def moments_now():  # C0 on the model as it is now (a lifelong turn's refresh and staleness diagnostics)
            return key_second_moments(model, tokenizer, modules, preservation())

        def heldout_moments_now():  # the perplexity sample's key moments (drift-energy diagnostics)
            return key_second_moments(model, tokenizer, modules, heldout())

        turns = ({"keep_edits": cfg.keep_edits, "preserve": preserve, "refresh_every": cfg.refresh_every,
                  "refresh_c0_every": cfg.refresh_c0_every,
                  "moments_now": moments_now, "heldout_moments_now": heldout_moments_now}
                 if lifelong else {})  # plain: each turn alone
        return HorseTurnEditor(model, editor, config.edit_modules, key_moments=moments, refinement=refinement,
                               anchor=cfg.refine_anchor, **turns)
    raise ValueError(f"Unknown sequential method '{method}'; choose from {METHODS}.")


def _summary(values: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    return {n: float(torch.cat(values[n]).mean()) for n in SCORE_NAMES if n in values and values[n]}


def _accumulate(into: dict[str, list[torch.Tensor]], values: dict[str, torch.Tensor]) -> None:
    for name, value in values.items():
        if value.numel():
            into.setdefault(name, []).append(value.detach().cpu())


class SequentialRun:
    """One request file, several methods, each on a fresh copy of the base model."""

    def __init__(self, cfg: SequentialConfig, requests: Sequence[EditRequest], out: Path):
        cfg.check()
        self.cfg, self.requests, self.out = cfg, list(requests), Path(out)
        self.turns = [list(range(s, min(s + cfg.turn_size, len(self.requests))))
                      for s in range(0, len(self.requests), cfg.turn_size)]
        # after-post scoring chunks; with a curve, a size that divides curve_every, so each point scores whole chunks
        size = max(d for d in range(1, 65) if cfg.curve_every % d == 0) if cfg.curve_every else 64
        self.chunks = [list(range(s, min(s + size, len(self.requests)))) for s in range(0, len(self.requests), size)]
        self.report: dict = {"config": asdict(cfg), "n_requests": len(self.requests), "methods": {}}
        self.general: GeneralCheck | None = None

    def score_unedited(self) -> None:
        """Tokenise the requests and score the unedited model: every request, the locality argmax LS_agree
        compares against, and the general abilities retention is measured against (the first step of :meth:`run`)."""
        cfg = self.cfg
        start = time.perf_counter()
        torch.manual_seed(cfg.seed)
        model, self.tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
        self.table = tokenize_requests(self.tokenizer, self.requests, EVAL_VIEWS, cfg.max_length, where="request")
        self.collate = EditCollator(EVAL_VIEWS, cfg.batch_size, self.tokenizer.pad_token_id)
        self.turn_locality = [self._locality(model, self._batch(t)) for t in self.turns]
        self.chunk_locality, unedited = [], {}
        for chunk in self.chunks:
            scores = score_batch(model, self._batch(chunk), EVAL_VIEWS)
            self.chunk_locality.append(scores.get("locality"))
            _accumulate(unedited, compute_scores(scores, None))
        self.report["unedited"] = _summary(unedited)
        if cfg.general_data and cfg.general_tasks:
            self.general = GeneralCheck(self.tokenizer, cfg.general_data, cfg.general_tasks, cfg.general_limit)
            self.report["general_before"] = self.general.baseline(model)
            self.report["general_tasks"] = self.general.task_table()
        self.report["unedited_seconds"] = time.perf_counter() - start

    def _batch(self, rows: Sequence[int]) -> EditBatch:
        return self.collate([self.table[i] for i in rows])

    @staticmethod
    def _locality(model, batch):
        return score_view(model, batch["locality"]) if batch.get("locality") else None

    def run_method(self, method: str) -> dict:
        from lightning.pytorch.loggers import TensorBoardLogger

        cfg = self.cfg.for_method(method)
        began = time.perf_counter()
        torch.manual_seed(cfg.seed)
        model, _ = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
        names = resolve_edit_modules(model, cfg.edit_modules)
        editor = build_editor(method, model, cfg, names)
        logger = TensorBoardLogger(save_dir=str(self.out), name="tb", version=method, default_hp_metric=False)
        history: list[dict] = []

        def diagnose(n_edits: int) -> None:
            diag = stability(editor.weights(), editor.original)
            diag.update(editor.diagnostics())
            row = {"n_edits": n_edits}
            for key, values in diag.items():
                row[key] = values
                metrics = {f"{key}/layer{i}": v for i, v in enumerate(values)}
                metrics[f"{key}/mean"] = sum(values) / len(values)
                logger.log_metrics(metrics, step=n_edits)
            history.append(row)

        diagnose(0)
        curve: list[dict] = []

        def curve_point(n_edits: int) -> None:
            # every request edited so far (whole chunks), scored on the model as it is now
            row = {"n_edits": n_edits, **self._after_post(model, n_edits)}
            if self.general is not None:
                row["retention"] = self.general.retention_of(model)
            logger.log_metrics({f"curve/{k}": v for k, v in row["after_post"].items()}, step=n_edits)
            curve.append(row)

        next_curve = cfg.curve_every or None
        post: dict[str, list[torch.Tensor]] = {}
        per_request_post: list[dict] = [{} for _ in self.requests]
        start, done, next_diag = time.perf_counter(), 0, cfg.diag_every
        edit_seconds = 0.0
        for turn, locality_before in track(list(zip(self.turns, self.turn_locality)), f"{method} turns"):
            batch = self._batch(turn)
            t0 = time.perf_counter()
            editor.edit(batch["edit"].micro_batches)
            edit_seconds += time.perf_counter() - t0
            done += len(turn)
            values = compute_scores(score_batch(model, batch, cfg.post_views), locality_before)
            _accumulate(post, values)
            for name in ("ES", "GS", "LS", "efficacy", "paraphrase", "neighborhood"):
                if name in values and values[name].numel() == len(turn):
                    for row, v in zip(turn, values[name].tolist()):
                        per_request_post[row][name] = v
            logger.log_metrics({f"post/{k}": float(v.mean()) for k, v in values.items() if v.numel()}, step=done)
            if done >= next_diag or done == len(self.requests):
                diagnose(done)
                next_diag = done + cfg.diag_every
            if next_curve is not None and done >= next_curve and done < len(self.requests):
                curve_point(done)
                next_curve = done + cfg.curve_every - done % cfg.curve_every
        sequence_seconds = time.perf_counter() - start
        result = {"post": _summary(post), **self._after_post(model, len(self.requests)),
                  "sequence_seconds": sequence_seconds, "edit_seconds": edit_seconds,
                  "seconds_per_edit": edit_seconds / max(done, 1), "diagnostics": history,
                  "per_request_post": per_request_post}
        logger.log_metrics({f"after_post/{k}": v for k, v in result["after_post"].items()}, step=done)
        if self.general is not None:
            general_after = self.general.score(model)
            result["general_after"] = general_after
            result["retention"] = self.general.retention(general_after)
            logger.log_metrics({f"retention/{k}": v for k, v in result["retention"].items() if v is not None},
                               step=done)
        if cfg.curve_every:
            curve.append({"n_edits": done, "n_scored": result["n_scored"], "after_post": result["after_post"],
                          **({"retention": result["retention"]} if "retention" in result else {})})
            result["curve"] = curve
        logger.finalize("success")
        result["method_seconds"] = time.perf_counter() - began  # load, turns, final scores and general check
        self.final_model = model  # the last method's edited model (tests score it independently)
        return result

    def _after_post(self, model, n_edits: int) -> dict:
        """Scores of the requests in the chunks wholly among the first ``n_edits`` (all of them at the end)."""
        after: dict[str, list[torch.Tensor]] = {}
        n_scored = 0
        for chunk, locality_before in zip(self.chunks, self.chunk_locality):
            if chunk[-1] >= n_edits:
                break
            _accumulate(after, compute_scores(score_batch(model, self._batch(chunk), EVAL_VIEWS), locality_before))
            n_scored += len(chunk)
        return {"after_post": _summary(after), "n_scored": n_scored}

    def run(self) -> dict:
        """Score the unedited model, then run every method on a fresh copy of it; the report is written after each."""
        began = time.perf_counter()
        self.score_unedited()
        for method in self.cfg.methods:
            log.info("sequential %s: %d requests in turns of %d", method, len(self.requests), self.cfg.turn_size)
            self.report["methods"][method] = self.run_method(method)
            self.write()
        plot_diagnostics(self.report, self.out / "diagnostics.png")
        if self.cfg.curve_every:
            plot_curve(self.report, self.out / "curve.png")
        self.report["seconds"] = time.perf_counter() - began  # the whole run: unedited scores and every method
        self.write()
        return self.report

    def write(self) -> None:
        (self.out / "sequential_report.json").write_text(json.dumps(self.report, indent=2))


RECORD_KEYS = ("post", "after_post", "retention", "general_after", "sequence_seconds", "edit_seconds",
               "seconds_per_edit", "method_seconds", "curve")


def result_record(report: dict, name: str, command: str, recipe: str | None = None) -> dict:
    """A small result record of a sequential run (the report without its per-request rows): the summaries,
    retention, the after-post curve, timing, the last stability diagnostics of every method and their means at
    every diagnostic point."""
    from horse_pl.records import provenance

    cfg = report["config"]
    extra = cfg.get("extra", {})
    split = (f"the development split of {extra.get('requests')} (its last {extra['dev_size']} valid records)"
             if extra.get("dev_size") else f"{extra.get('requests')}")
    methods = {}
    for method, result in report["methods"].items():
        methods[method] = {k: result[k] for k in RECORD_KEYS if k in result}
        last = result["diagnostics"][-1]
        methods[method]["stability"] = {k: v for k, v in last.items() if k != "n_edits"}
        # every diagnostic point, as the mean over the edited matrices (drift, staleness of a lifelong solve's keys)
        methods[method]["stability_curve"] = [{k: (v if k == "n_edits" else sum(v) / len(v)) for k, v in row.items()}
                                              for row in result["diagnostics"]]
    return {**provenance(command), "kind": "sequential", "name": name, "recipe": recipe,
            "protocol": f"{report['n_requests']} requests of {split}, {cfg['turn_size']} per turn, never restored; "
                        "after-post = every request on the final model",
            "config": {k: v for k, v in cfg.items() if k != "extra"}, "requests": extra,
            "unedited": report["unedited"], "general_before": report.get("general_before"),
            "unedited_seconds": report.get("unedited_seconds"), "seconds": report.get("seconds"), "methods": methods}


def curve_panels(axes, report: dict, panels, prefix: str = "") -> None:
    """One panel per ``(key, title, where)``: each method's curve points (``where``: ``after_post`` or
    ``retention``) against edits done, with the unedited score as a dashed line."""
    for ax, (key, title, where) in zip(axes, panels):
        for method, result in report["methods"].items():
            points = [(p["n_edits"], (p.get(where) or {}).get(key)) for p in result.get("curve", [])]
            points = [(n, v) for n, v in points if v is not None]
            if points:
                ax.plot(*zip(*points), marker=".", label=method)
        if where == "after_post" and key in report["unedited"]:
            ax.axhline(report["unedited"][key], color="grey", ls="--", lw=1, label="unedited")
        ax.set_title(prefix + title, fontsize=9 if prefix else 10)
        ax.set_xlabel("edits done")
        ax.grid(alpha=0.3)


def plot_curve(report: dict, path: Path) -> None:
    """After-post efficacy (or ES) of the requests edited so far, and general-ability retention, against edits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    score = "efficacy" if "efficacy" in report["unedited"] else "ES"
    panels = ((score, f"after-post {score}", "after_post"), ("neighborhood" if score == "efficacy" else "LS_agree",
              "after-post neighbourhood" if score == "efficacy" else "after-post LS_agree", "after_post"),
              ("perplexity", "perplexity retention", "retention"), ("mean", "task retention", "retention"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    curve_panels(axes, report, panels)
    axes[0].legend(fontsize=8)
    cfg = report["config"]
    fig.suptitle(f"Lifelong editing: {report['n_requests']} requests, {cfg['turn_size']} per turn", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_diagnostics(report: dict, path: Path) -> None:
    """Diagnostic vs number of edits, one line per method: the mean over that method's edited matrices of
    the condition number and ``||W||_F`` relative to the unedited matrix, ``||W - W0||_F`` and MOSE's
    orthogonality error (log scales, so that small and large changes are both visible)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("condition_number", "condition number / unedited", True), ("frobenius_norm", "||W||_F / unedited", True),
              ("drift", "||W - W0||_F", False), ("orthogonality_error", "||Q^T Q - I||_F (MOSE)", False))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, title, relative) in zip(axes, panels):
        for method, result in report["methods"].items():
            rows = [r for r in result["diagnostics"] if key in r]
            if not rows:
                continue
            first = rows[0][key]
            values = [[v / f for v, f in zip(r[key], first)] if relative else r[key] for r in rows]
            ax.plot([r["n_edits"] for r in rows], [sum(v) / len(v) for v in values], marker=".", label=method)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("edits")
        ax.set_yscale("log" if relative else "symlog", **({} if relative else {"linthresh": 1e-6}))
        ax.grid(alpha=0.3, which="both")
    axes[0].legend()
    fig.suptitle(f"Stability of the edited matrices (mean over each method's edit modules), "
                 f"{report['n_requests']} sequential edits", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
