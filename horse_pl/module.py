"""The LightningModule: meta-train the editor hypernetwork around a frozen language model.

One training step = one edit batch: capture, normaliser, predict, spread, solve, apply, losses, revert,
backward, step (:meth:`EditorModule.training_step`).
Validation edits each eval batch with the current editor and scores it beside the unedited model.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import RichProgressBar

from horse_pl.callbacks import SaveLastOnSigterm, StepProgressBar
from horse_pl.data.batch import EVAL_VIEWS, EditBatch
from horse_pl.edit_modules import get_modules, layer_index, resolve_edit_modules, weight_shape
from horse_pl.editing.editor import Editor
from horse_pl.editing.evaluate import edit_and_score
from horse_pl.editing.key_stats import DEFAULT_GENERAL_DATA, bind_preservation
from horse_pl.editing.shifts import applied
from horse_pl.editing.spread import GramSchmidtSpread, Spread, spread_diagnostics
from horse_pl.editing.update import ClosedFormUpdate, ParamShiftUpdate
from horse_pl.lm import answer_ce, answer_logits
from horse_pl.metrics import make_metrics, update_metrics
from horse_pl.models import DEFAULT_MODEL, load_model, model_fingerprint, parse_dtype
from horse_pl.reduction import LOCAL, Reduction, distributed
from horse_pl.sequential.general import RetentionMeans
from horse_pl.timing import StageTimer


class FingerprintMismatch(RuntimeError):
    """A checkpoint or editor was trained on a different base model."""


class EditorModule(L.LightningModule):
    """Frozen LM + trainable editor (HORSE by default; MALMEN and MEND through the stages and losses).

    Args:
        model: Hugging Face id or folder, or ``embedded:smollm2-135m`` / ``embedded:gemma3-270m``.
        model_dtype: dtype of the frozen LM (``float32``, ``bfloat16``).
        edit_modules: ``"last:6"``, ``"layers:24-29"`` or a list of module names.
        rank: rank of the hypernetwork's low-rank blocks.
        n_blocks: number of hypernetwork blocks.
        lr: initial per-layer editing learning rate.
        meta_lr: Adam learning rate of the hypernetwork.
        meta_lr_schedule: ``constant``, or ``cosine``: decay ``meta_lr`` to ``meta_lr * min_meta_lr_ratio``
            over the run's ``max_steps`` (one step per edit batch).
        min_meta_lr_ratio: the cosine schedule's final fraction of ``meta_lr``.
        spread: residual spread stage (default HORSE ``GramSchmidtSpread``; ``ReferenceSpread``, MALMEN ``NoSpread``).
        update: how residuals become shifts (default ``ClosedFormUpdate``; MEND ``OuterProductUpdate``).
        positions: capture at ``answer`` tokens (HORSE/MALMEN), ``all`` tokens (MEND) or the ``subject``'s last
            prompt token (MEMIT's key: one row per edit, apart from other subjects' facts of the same relation).
        learn_lambda: learn the ridge coefficient (MALMEN) or keep ``lambda = 0`` (HORSE).
        locality: ``ce`` (HORSE: cross-entropy of the unrelated answer) or ``kl`` (MALMEN/MEND: KL to the
            unedited model on the unrelated answer positions).
        loc_coef: weight of the locality loss.
        max_grad_norm: gradient clipping of the hypernetwork.
        chunk_size: hypernetwork rows per chunk.
        cache_dtype: dtype of captured keys and value gradients (``float32`` or ``bfloat16``).
        general_data: folder of the general-ability data, whose texts give the key moments of an update stage
            with a preservation term (``ClosedFormUpdate(preserve=...)``).
        preserve_facts_data: records file whose true facts give the key moments of a ``preserve_facts`` term (the
            first 4,096 valid records; recipes name their training file, whose last ``dev_size`` records they hold
            out, so the development split stays unseen); exported editors remember it.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        model_dtype: str = "float32",
        edit_modules: str | list[str] = "last:6",
        rank: int = 1920,
        n_blocks: int = 2,
        lr: float = 1e-6,
        meta_lr: float = 1e-5,
        meta_lr_schedule: Literal["constant", "cosine"] = "constant",
        min_meta_lr_ratio: float = 0.0,
        spread: Spread | None = None,
        update: ParamShiftUpdate | None = None,
        positions: Literal["answer", "all", "subject"] = "answer",
        learn_lambda: bool = False,
        locality: Literal["ce", "kl"] = "ce",
        loc_coef: float = 1.0,
        max_grad_norm: float = 1.0,
        chunk_size: int = 1024,
        cache_dtype: str = "float32",
        general_data: str = DEFAULT_GENERAL_DATA,
        preserve_facts_data: str | None = None,
    ):
        super().__init__()
        if meta_lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"--model.meta_lr_schedule must be 'constant' or 'cosine', not '{meta_lr_schedule}'.")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the editor, not the frozen LM's weights
        # Safe defaults: the HORSE spread and the closed-form solve unless the recipe names others.
        self.spread_stage = spread if spread is not None else GramSchmidtSpread()
        self.update_stage = update if update is not None else ClosedFormUpdate()
        self.lm = None
        self.editor: Editor | None = None
        self.val_metrics, self.pre_metrics = make_metrics(), make_metrics()
        self.test_metrics = make_metrics()
        self._baseline_done = False
        self._general: RetentionMeans | None = None  # built on the first evaluation that asks for it
        self._validated_step: int | None = None  # global step of the latest validation (for the model card)

    # ----------------------------------------------------------------- setup
    def configure_model(self) -> None:
        """Load the frozen LM and build the editor for its edit modules (once)."""
        if self.editor is not None:
            return
        hp = self.hparams
        # the default device: the accelerator under Lightning's init context (a 7B model never passes through the
        # CPU), the CPU otherwise
        lm, tokenizer = load_model(hp.model, dtype=hp.model_dtype, device=torch.get_default_device())
        self.module_names = sorted(resolve_edit_modules(lm, hp.edit_modules), key=layer_index)
        shapes = [weight_shape(m) for m in get_modules(lm, self.module_names)]
        self.editor = Editor(shapes, hp.rank, hp.n_blocks, hp.lr, self.spread_stage, self.update_stage,
                             hp.positions, hp.learn_lambda, hp.chunk_size, parse_dtype(hp.cache_dtype))
        bind_preservation(self.editor, lm, tokenizer, self.module_names, hp.general_data,
                          hp.get("preserve_facts_data"))
        self.lm = lm  # registered last: a frozen submodule, dropped from checkpoints below
        self.fingerprint = model_fingerprint(lm)

    @property
    def edit_modules(self):
        return get_modules(self.lm, self.module_names)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.Adam([p for p in self.editor.parameters() if p.requires_grad], lr=hp.meta_lr)
        if hp.meta_lr_schedule == "constant":
            return optimizer
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total),
                                                               eta_min=hp.meta_lr * hp.min_meta_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------- checkpoints
    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        return type(state)((k, v) for k, v in state.items() if not k.startswith(f"{prefix}lm."))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["horse_pl"] = {"base_model": self.hparams.model, "fingerprint": self.fingerprint,
                                  "edit_modules": self.module_names, "shapes": self.editor.hypernet.shapes}
        trainer = self._trainer
        scores = {k: float(v) for k, v in (trainer.callback_metrics if trainer else {}).items()
                  if k.startswith("val/")}
        if scores:  # the latest validation, for the exported editor's model card
            checkpoint["horse_pl"]["validation"] = {"metrics": scores, "step": self._validated_step}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.configure_model()
        saved = checkpoint.get("horse_pl", {})
        if saved and saved.get("fingerprint") != self.fingerprint:
            raise FingerprintMismatch(
                f"This checkpoint was trained on base model '{saved.get('base_model')}' (fingerprint "
                f"{saved.get('fingerprint')}), but the loaded model '{self.hparams.model}' has fingerprint "
                f"{self.fingerprint}; resume with the same --model.model."
            )

    # ---------------------------------------------------------------- editing
    @property
    def all_reduce(self) -> Reduction:
        """Sum across DDP processes (none in a single process)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return LOCAL
        return distributed()

    def _local(self, batch: EditBatch) -> EditBatch:
        if self._trainer is None:
            return batch
        return batch.shard(self.trainer.global_rank, self.trainer.world_size)

    def locality_reference(self, batch: EditBatch) -> list[torch.Tensor]:
        """KL locality: the unedited model's log-probabilities at the unrelated answers (nothing for ``ce``)."""
        if self.hparams.locality != "kl":
            return []
        with torch.no_grad():
            return [torch.log_softmax(answer_logits(self.lm, mb)[0], -1) for mb in batch["locality"]]

    def meta_losses(self, batch: EditBatch, reference: list[torch.Tensor]) -> dict[str, float]:
        """Generalisation and locality losses of the model as it is (the shifts applied); backward into the
        shifts' ``.grad``. ``reference``: :meth:`locality_reference`."""
        hp = self.hparams
        gen_total, loc_total = 0.0, 0.0
        for mb in batch["rephrase"]:
            loss = answer_ce(self.lm, mb)
            self.manual_backward(loss)
            gen_total += float(loss.detach())
        for i, mb in enumerate(batch["locality"]):
            if hp.locality == "ce":
                loss = answer_ce(self.lm, mb)
            else:
                logits = answer_logits(self.lm, mb)[0]
                loss = F.kl_div(torch.log_softmax(logits, -1), reference[i], log_target=True, reduction="batchmean")
            self.manual_backward(hp.loc_coef * loss)
            loc_total += float(loss.detach())
        return {"gen_loss": gen_total, "loc_loss": loc_total}

    # --------------------------------------------------------------- training
    def configure_callbacks(self):
        """A pre-empted run (SIGTERM) saves last.ckpt after its running step; Lightning's default rich progress bar
        counts steps and edits instead of epochs (a bar the user configured or switched off is left alone)."""
        callbacks = [SaveLastOnSigterm()]
        if type(getattr(self._trainer, "progress_bar_callback", None)) is RichProgressBar:
            callbacks.append(StepProgressBar())
        return callbacks

    def on_train_start(self) -> None:
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(self.trainer.strategy.model, DistributedDataParallel):
            # Editor gradients are summed across processes explicitly (Editor.backward); DDP's reducer
            # would average after the first of the chunked backward passes instead.
            self.trainer.strategy.model.require_backward_grad_sync = False

    def training_step(self, batch: EditBatch, batch_idx: int) -> None:
        """One edit batch: capture, normaliser, predict + spread + solve, apply, losses, revert, backward, step."""
        batch, reduce, timer = self._local(batch), self.all_reduce, StageTimer(self.device)
        with timer("capture"):
            cap = self.editor.capture(self.lm, self.edit_modules, batch["edit"].micro_batches, training=True)
        with timer("normalizer"):
            self.editor.hypernet.update_normalizer(cap.keys, cap.value_grads, reduce)
        state = self.editor.param_shifts(cap, reduce, requires_grad=True, timer=timer)
        with timer("losses"):
            reference = self.locality_reference(batch)
            with applied(self.edit_modules, state.param_shifts):
                losses = self.meta_losses(batch, reference)
        with timer("backward"):
            shift_grads = [reduce(s.grad) for s in state.param_shifts]  # G_W of the global loss
            self.editor.backward(cap, state, shift_grads, reduce)
        with timer("optimizer"):
            self.hypernet_step()
        self._log_step(batch, cap.loss, losses, state, timer.seconds)

    def hypernet_step(self) -> None:
        """Clip, step and zero the hypernetwork's optimiser; step the schedule (once per edit batch)."""
        optimizer = self.optimizers()
        self.log("train/meta_lr", optimizer.param_groups[0]["lr"], batch_size=1)  # this step's rate
        self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def _log_step(self, batch, edit_loss, losses, state, seconds) -> None:
        n = batch.n_edits
        # each process holds some micro-batches: the logged losses are sums over all of them
        self.log("train/gen_loss", losses["gen_loss"], prog_bar=True, batch_size=n, sync_dist=True, reduce_fx="sum")
        self.log("train/loc_loss", losses["loc_loss"], prog_bar=True, batch_size=n, sync_dist=True, reduce_fx="sum")
        self.log("train/edit_loss_before", edit_loss, batch_size=n, sync_dist=True, reduce_fx="mean")
        self.log("edits", float((self.global_step) * n), prog_bar=True, batch_size=n)
        layers = [layer_index(name) for name in self.module_names]
        for position, layer in enumerate(layers):
            self.log(f"train/lr/layer{layer}", self.editor.hypernet.lr(position).detach(), batch_size=n)
            self.log(f"train/lambda/layer{layer}", self.editor.hypernet.log_lambda(position).detach(), batch_size=n)
        diagnostics = spread_diagnostics(state.residuals, state.spread_residuals, layers, self.all_reduce)
        for name, value in diagnostics.items():
            self.log(f"spread/{name}", value, batch_size=n)
        for name, value in seconds.items():
            self.log(f"time/{name}", value, batch_size=n)
        self.log("time/step", sum(seconds.values()), batch_size=n)

    # ------------------------------------------------------------- evaluation
    def _evaluate(self, batch: EditBatch, metrics) -> None:
        # the unedited model's scores are computed once, on the first full evaluation
        result = edit_and_score(self.editor, self.lm, self.edit_modules, self._local(batch), EVAL_VIEWS,
                                score_before=not self._baseline_done, all_reduce=self.all_reduce)
        if result.values_before is not None:
            update_metrics(self.pre_metrics, result.values_before)
        update_metrics(metrics, result.values_after)
        if self._general is None and self._trainer is not None:
            self._general = RetentionMeans.asked_by(self.trainer.datamodule, self.hparams.general_data)
        if self._general is not None:  # every process holds the same shifts: each scores the whole sample
            self._general.baseline(self.lm)
            with applied(self.edit_modules, result.state.param_shifts):
                self._general.update(self.lm)

    def validation_step(self, batch: EditBatch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def test_step(self, batch: EditBatch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    def _log_metrics(self, metrics, prefix: str) -> None:
        for name, metric in metrics.items():
            if metric.update_count:
                self.log(f"{prefix}/{name}", metric.compute(), prog_bar=name in ("ES", "GS", "LS"), sync_dist=False)
            metric.reset()

    def _end_eval(self, metrics, prefix: str) -> None:
        self._log_metrics(metrics, prefix)
        if self._general is not None and self._general.values:
            for name, value in self._general.compute().items():
                self.log(f"{prefix}/general/{name}", value, sync_dist=False)
            self._general.reset()
        if self.trainer.sanity_checking:  # a partial pass: the baseline waits for a full one
            self.pre_metrics.reset()
            return
        if not self._baseline_done:
            self._baseline = {n: m.compute() for n, m in self.pre_metrics.items() if m.update_count}
            self._baseline_done = True
        for name, value in self._baseline.items():
            self.log(f"{prefix}/unedited_{name}", value)

    def on_validation_epoch_end(self) -> None:
        self._end_eval(self.val_metrics, "val")
        self._validated_step = self.global_step

    def on_test_epoch_end(self) -> None:
        self._end_eval(self.test_metrics, "test")
