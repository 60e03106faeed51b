"""The editing pipeline as one object shared by training, validation, edit.py and the sequential HORSE editor.

``capture -> predict (hypernetwork, row chunks) -> spread -> solve`` produces the shifts (:meth:`param_shifts`);
``backward`` turns ``G_W = dL/d(dW)`` into hypernetwork gradients: first ``dL/dR~`` from the update
stage, then through the spread by autograd on the (small) residual tensors, then through the
hypernetwork in row chunks so memory stays bounded for thousands of edits.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from horse_pl.data.tokenize import IGNORE_INDEX
from horse_pl.edit_modules import weight_in_out
from horse_pl.editing.capture import Capture, capture, record_mask
from horse_pl.editing.shifts import applied, applied_at, output_energy, relative_output_change
from horse_pl.editing.spread import AllReduce, GramSchmidtSpread, Spread
from horse_pl.editing.update import ClosedFormUpdate, ParamShiftUpdate
from horse_pl.hypernet import HyperNetwork
from horse_pl.lm.passes import answer_logits, unlanded_answer_ce
from horse_pl.progress import track
from horse_pl.reduction import LOCAL
from horse_pl.timing import StageTimer

REFINE_AT = ("all", "keys")


@dataclass(frozen=True)
class Refinement:
    """Settings of :meth:`Editor.refine` (edit time only; the hypernetwork is not trained through it).

    Args:
        steps: Adam steps on the residuals (0: no refinement, the hypernetwork's one step).
        lr: Adam rate relative to the RMS of each module's first residuals.
        target: a request whose answer tokens' geometric-mean probability reaches it drops out of the loss, so edits
            that have landed stop pulling the residuals (1: none drops out).
        preserve: weight of ``tr(dW^T C0 dW)`` in the refined loss, the mean squared output change on the keys of
            unrelated text (``C0``, the key moments the preservation term uses; 0: none).
        at: where the refined loss sees the solved shifts act: ``all`` positions (as the edited model applies them)
            or only the ``keys`` positions the editor captures its keys at (MEMIT's value optimisation: with a
            subject-keyed editor the loss can only be lowered through the subject's hidden state, not through the
            prompt's other words). The edit itself always applies the shifts everywhere.
        prefixes: how many context prefixes (MEMIT's, :func:`horse_pl.data.prefixes.context_prefixes`) the refined
            loss also reads every edit prompt behind, so the edit is fitted in other contexts than the prompt alone
            (0: the edit prompts alone). Each adds one pass of the edit prompts per step.
        paraphrases: how many rephrasings of each edit prompt (:class:`horse_pl.data.paraphrases.ParaphraseBank`: the
            rephrase prompts a records file pairs with the same question template, filled with the request's subject)
            the refined loss also reads with the edit's answer, so the edit is fitted to the question asked in other
            words (0: none). Each adds up to one pass of the edit prompts per step.
        locality: weight of the mean KL divergence from the unrelated answers' distributions before the refinement
            to those with the refined shifts, at the answer tokens of unrelated questions
            (``RefinementBatches.anchors``; MALMEN's locality loss, at edit time; 0: none). Adds one pass of those
            questions per step.
        general: weight of the mean KL divergence from the next-token distributions of plain text before the
            refinement to those with the refined shifts, at every token of the texts (``RefinementBatches.texts``;
            a function-space anchor for the model's general language, where ``preserve`` anchors the edit modules'
            outputs; 0: none). Adds one pass of those texts per step.
        budget: the most the refined shifts may move the edit modules' outputs on unrelated text, relative to those
            outputs (:func:`horse_pl.editing.shifts.relative_output_change`, on the same ``C0`` as ``preserve``;
            0: no bound). After each step, residuals whose shifts pass it are scaled back onto it (the solve is
            linear in the residuals). Where ``preserve`` prices the change at a fixed rate, so an edit set that
            pulls harder moves the model further, the budget holds the change itself the same from one edit set
            to the next.
    """

    steps: int = 0
    lr: float = 0.1
    target: float = 1.0
    preserve: float = 0.0
    at: str = "all"
    prefixes: int = 0
    locality: float = 0.0
    general: float = 0.0
    paraphrases: int = 0
    budget: float = 0.0

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"The refinement steps must be at least 0, not {self.steps}.")
        if not self.lr > 0:
            raise ValueError(f"The refinement lr must be positive, not {self.lr}.")
        if not 0 < self.target <= 1:
            raise ValueError(f"The refinement target must be a probability in (0, 1], not {self.target}.")
        if self.preserve < 0:
            raise ValueError(f"The refinement preserve weight must be at least 0, not {self.preserve}.")
        if self.locality < 0:
            raise ValueError(f"The refinement locality weight must be at least 0, not {self.locality}.")
        if self.general < 0:
            raise ValueError(f"The refinement general weight must be at least 0, not {self.general}.")
        if self.prefixes < 0:
            raise ValueError(f"The refinement's context prefixes must be at least 0, not {self.prefixes}.")
        if self.paraphrases < 0:
            raise ValueError(f"The refinement's rephrasings per request must be at least 0, not {self.paraphrases}.")
        if self.budget < 0:
            raise ValueError(f"The refinement budget must be at least 0 (0: no bound), not {self.budget}.")
        if self.at not in REFINE_AT:
            raise ValueError(f"The refinement's 'at' must be one of {list(REFINE_AT)}, not '{self.at}'.")

    def __bool__(self) -> bool:
        return self.steps > 0


@dataclass(frozen=True)
class RefinementBatches:
    """What a :class:`Refinement` reads beside the edit prompts, as micro-batches
    (``KnowledgeEditor.refinement_batches`` builds them): ``context``, the edit prompts behind context prefixes (for
    ``prefixes``) and in other words (for ``paraphrases``); ``anchors``, unrelated questions with their answers (for
    ``locality``); ``texts``, plain text labelled at every token (for ``general``)."""

    context: Sequence = ()
    anchors: Sequence = ()
    texts: Sequence = ()

    def check(self, refinement: Refinement) -> None:
        """A one-sentence error where a term is asked for without its batches, or batches come without their term."""
        for name, setting, batches in (("context", refinement.prefixes or refinement.paraphrases, self.context),
                                       ("anchors", refinement.locality, self.anchors),
                                       ("texts", refinement.general, self.texts)):
            if bool(setting) != bool(batches):
                raise ValueError(f"RefinementBatches.{name} must be given exactly when the refinement asks for them "
                                 f"(here {setting}, with {len(batches)} micro-batches); "
                                 "KnowledgeEditor.refinement_batches builds them.")


NO_BATCHES = RefinementBatches()


@dataclass
class EditState:
    """Everything one edit batch produces, kept for the hypernetwork's backward pass."""

    update_keys: list[torch.Tensor]
    residuals: list[torch.Tensor]  # before the spread; carry the hypernetwork graph when it was kept
    spread_residuals: list[torch.Tensor]
    param_shifts: list[torch.Tensor]  # fp32, (d_in, d_out)
    graph: tuple | None = None  # (update keys, residuals) with the hypernetwork graph, when kept
    factors: list | None = None  # the update stage's per-module solve factors, reused by the backward pass


class Editor(nn.Module):
    """Hypernetwork + pluggable spread and update stages.

    Args:
        shapes: (d_in, d_out) of each edit module, in depth order.
        rank, n_blocks, lr: hypernetwork sizes and the initial per-layer editing learning rate.
        spread: the residual spread stage (default HORSE Gram-Schmidt).
        update: how residuals become parameter shifts (default the closed-form ridge solve).
        positions: capture keys at ``answer`` tokens (MALMEN/HORSE), ``all`` tokens (MEND) or ``subject`` (the
            subject's last prompt token, MEMIT's key).
        learn_lambda: learn the per-layer ridge coefficient (MALMEN) or keep ``lambda = 0`` (HORSE).
        chunk_size: hypernetwork rows per chunk.
        cache_dtype: dtype of captured keys and value gradients.
    """

    def __init__(
        self,
        shapes: Sequence[tuple[int, int]],
        rank: int = 1920,
        n_blocks: int = 2,
        lr: float = 1e-6,
        spread: Spread | None = None,
        update: ParamShiftUpdate | None = None,
        positions: str = "answer",
        learn_lambda: bool = False,
        chunk_size: int = 1024,
        cache_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.hypernet = HyperNetwork(shapes, rank, n_blocks, lr)
        self.spread = spread if spread is not None else GramSchmidtSpread()
        self.update = update if update is not None else ClosedFormUpdate()
        self.positions, self.chunk_size, self.cache_dtype = positions, chunk_size, cache_dtype
        self.learn_lambda = learn_lambda and self.update.uses_lambda
        for net in self.hypernet.nets.values():
            net.lamda.weight.requires_grad_(self.learn_lambda)
        # rows (requests) of the training micro-batches, 0 until trained; saved with the editor
        self.register_buffer("micro_batch_rows", torch.zeros((), dtype=torch.int64))
        self._refine_hooks: OrderedDict[int, Callable] = OrderedDict()

    def register_refine_hook(self, hook: Callable[[int, list[torch.Tensor]], None]) -> RemovableHandle:
        """Call ``hook(step, param_shifts)`` with the solved shifts before each refinement step and after the last
        (``step`` 0 to ``refinement.steps``; the model carries no shifts while it runs), to watch a refinement as it
        goes (``benchmarks/edit_quality.py --trace-every``). Returns a handle whose ``remove()`` takes it off."""
        handle = RemovableHandle(self._refine_hooks)
        self._refine_hooks[handle.id] = hook
        return handle

    def bind_key_moments(self, moments: Sequence[torch.Tensor], kind: str = "key") -> None:
        """Give the update stage each edit module's ``C0`` (``kind="key"``,
        :func:`horse_pl.editing.key_stats.cached_key_moments`) or ``F`` (``kind="fact"``, the keys at known facts'
        answers, :func:`horse_pl.editing.key_stats.cached_fact_moments`). They are buffers that move with the editor
        but are never saved: they come from the base model."""
        if len(moments) != self.n_modules:
            raise ValueError(f"Got {kind} moments for {len(moments)} modules; the editor edits {self.n_modules}.")
        for position, moment in enumerate(moments):
            self.register_buffer(f"{kind}_moment_{position}", moment, persistent=False)

    def _moments(self, kind: str) -> list[torch.Tensor] | None:
        if not hasattr(self, f"{kind}_moment_0"):
            return None
        return [getattr(self, f"{kind}_moment_{p}") for p in range(self.n_modules)]

    @property
    def key_moments(self) -> list[torch.Tensor] | None:
        return self._moments("key")

    @property
    def fact_moments(self) -> list[torch.Tensor] | None:
        return self._moments("fact")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # editors saved before micro_batch_rows existed load with it unknown (0: no rescaling in capture)
        state_dict.setdefault(prefix + "micro_batch_rows", torch.zeros((), dtype=torch.int64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def log_lambdas(self) -> list[torch.Tensor]:
        return [self.hypernet.log_lambda(p) for p in range(self.n_modules)]

    @property
    def n_modules(self) -> int:
        return len(self.hypernet.shapes)

    def capture(self, model: nn.Module, modules: Sequence[nn.Module], micro_batches, training: bool = False) -> Capture:
        """Keys and value gradients of every edit module on the edit prompts. Training records the size of its
        micro-batches; outside training a micro-batch of another size gets the value-gradient scale of a
        training one (see :func:`horse_pl.editing.capture.capture`'s ``full_rows``)."""
        if training and micro_batches:
            rows = max(mb["labels"].shape[0] for mb in micro_batches)
            self.micro_batch_rows.fill_(max(rows, int(self.micro_batch_rows)))
        return capture(model, modules, micro_batches, self.positions, self.cache_dtype,
                       full_rows=0 if training else int(self.micro_batch_rows))

    def _residual_rows(self, cap: Capture, position: int, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.hypernet.dtype
        keys = cap.keys[position][rows].to(dtype)
        grads = cap.value_grads[position][rows].to(dtype)
        pseudo_keys, pseudo_grads = self.hypernet(keys, grads, position)
        return self.update.residuals(keys, pseudo_keys, pseudo_grads, self.hypernet.lr(position))

    def predict(self, cap: Capture, keep_graph: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Update keys and residuals of every edit module, computed in row chunks; with ``keep_graph``
        (all rows in one chunk) the hypernetwork graph is kept so the backward pass need not recompute it."""
        update_keys, residuals = [], []
        with torch.set_grad_enabled(keep_graph), nullcontext() if keep_graph else self.hypernet.fused(cap.n_rows):
            for position in range(self.n_modules):
                parts = [self._residual_rows(cap, position, slice(s, s + self.chunk_size))
                         for s in range(0, cap.n_rows, self.chunk_size)]
                update_keys.append(torch.cat([p[0] for p in parts]))
                residuals.append(torch.cat([p[1] for p in parts]))
        return update_keys, residuals

    def param_shifts(self, cap: Capture, all_reduce: AllReduce = LOCAL, requires_grad: bool = False,
                     timer: StageTimer | None = None) -> EditState:
        """Predict, spread and solve: the parameter shifts for this edit batch (``timer`` gets the seconds of
        ``predict``, ``spread`` and ``solve``). With ``requires_grad`` the shifts are leaves whose ``.grad`` the
        meta-losses fill, and the hypernetwork graph is kept when all rows fit one chunk."""
        stage = timer if timer is not None else (lambda name: nullcontext())
        keep_graph = requires_grad and cap.n_rows <= self.chunk_size
        with stage("predict"):
            graph_keys, graph_residuals = self.predict(cap, keep_graph)
            update_keys, residuals = [k.detach() for k in graph_keys], [r.detach() for r in graph_residuals]
        with stage("spread"):
            spread_residuals = self.spread(residuals, cap.value_grads, all_reduce)
        with stage("solve"):
            solved, factors = self.update.solve(update_keys, spread_residuals, self.log_lambdas(), all_reduce,
                                                self.key_moments, self.fact_moments)
            shifts = [shift.detach().requires_grad_(requires_grad) for shift in solved]
        state = EditState(update_keys, residuals, spread_residuals, shifts, factors=factors)
        if keep_graph:
            state.graph = (graph_keys, graph_residuals)
        return state

    def refine(self, model: nn.Module, modules: Sequence[nn.Module], micro_batches, state: EditState,
               refinement: Refinement, all_reduce: AllReduce = LOCAL,
               unrelated_moments: Sequence[torch.Tensor] | None = None,
               applied_shifts: Sequence[torch.Tensor] | None = None,
               batches: RefinementBatches = NO_BATCHES) -> EditState:
        """Refine the spread residuals by ``refinement.steps`` Adam steps on the edit prompts' cross-entropy with the
        solved shifts applied: test-time value optimisation (MEMIT's ``v*``) through this editor's own solve, from
        the hypernetwork's residuals. Each step is one forward + backward of the edit prompts; the gradient at the
        shifts goes back to the residuals through the update stage (:meth:`ParamShiftUpdate.solve_grads`), so the
        solve's own preservation terms still hold. See :class:`Refinement` for the settings. ``refinement.preserve``
        charges the output change on ``unrelated_moments`` (each module's ``C0``; default the bound key moments, which
        are ``C0`` except where a caller bound another preservation matrix, as lifelong editing does).
        ``applied_shifts`` (each module's (d_in, d_out), shifts the model already carries) makes the charge
        ``tr((A + dW)^T C0 (A + dW))``, the total output change since before ``A``: lifelong turns pass ``W - W0``, so a
        turn pays for the drift it adds to the earlier turns' instead of only its own (an output-space norm anchor).
        ``batches``: what the prefixes, locality and general terms read (:class:`RefinementBatches`)."""
        if not refinement:
            return state
        batches.check(refinement)
        micro_batches = list(micro_batches) + list(batches.context)
        # the distributions the locality and general terms keep: the model's as the refinement found it
        kept = [(group, weight) for group, weight in ((batches.anchors, refinement.locality),
                                                      (batches.texts, refinement.general)) if weight]
        with torch.no_grad():
            references = [[torch.log_softmax(answer_logits(model, mb)[0], -1) for mb in group] for group, _ in kept]
        n_tokens = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches)
        residuals = [r.detach().clone() for r in state.spread_residuals]
        optimiser = torch.optim.Adam([{"params": [r], "lr": refinement.lr * float(r.float().pow(2).mean().sqrt())
                                       or refinement.lr} for r in residuals])
        log_lambdas = [lam.detach() for lam in self.log_lambdas()]
        moments = self.key_moments
        unrelated = list(unrelated_moments) if unrelated_moments is not None else moments
        if applied_shifts is not None and not refinement.preserve:
            raise ValueError("Charging the applied shifts needs a refinement with preserve > 0.")
        if (refinement.preserve or refinement.budget) and unrelated is None:
            raise ValueError("Refinement with preserve or budget > 0 needs the edit modules' key moments; build the "
                             "editor through EditorModule or KnowledgeEditor, which compute them.")
        if refinement.budget and applied_shifts is not None:
            raise ValueError("A refinement budget bounds one edit's shifts; lifelong turns charge the applied shifts "
                             "with preserve instead.")

        factors = None  # keys, lambdas and moments stay: factor once, then only the residuals are solved again
        # the charge's gradient 2 mu C0 (A + dW): C0 A is the same at every step
        charged_applied = ([0.0] * len(residuals) if applied_shifts is None or not refinement.preserve else
                           [c0.float() @ a.to(c0.device, torch.float32) for c0, a in zip(unrelated, applied_shifts)])

        # the budget's denominator: the weights' outputs on unrelated text, the same at every step
        output_base = output_energy([weight_in_out(m) for m in modules], unrelated) if refinement.budget else None

        def solve(step: int):
            """The shifts of the current residuals (back onto the budget), shown to the refine hooks as ``step``."""
            with torch.no_grad():
                solved, factored = self.update.solve(state.update_keys, residuals, log_lambdas, all_reduce,
                                                     moments, self.fact_moments, factors=factors)
                if refinement.budget:  # back onto the budget: shifts scale with the residuals
                    change = relative_output_change(modules, solved, unrelated, output_base)
                    if change > refinement.budget:
                        scale = (refinement.budget / change) ** 0.5
                        for residual in residuals:
                            residual.mul_(scale)
                        solved = [shift * scale for shift in solved]
            for hook in self._refine_hooks.values():
                hook(step, solved)
            return solved, factored
        for step in track(range(refinement.steps), "refine"):
            solved, factors = solve(step)
            shifts = [shift.detach().requires_grad_(True) for shift in solved]
            keyed = refinement.at == "keys"  # the shifts act per row group, at its key positions alone

            def around(group, shifts=shifts):
                return applied_at(modules, shifts, record_mask(group, self.positions))
            with torch.enable_grad(), nullcontext() if keyed else applied(modules, shifts):
                for mb in micro_batches:
                    unlanded_answer_ce(model, mb, refinement.target, around if keyed else None).div(n_tokens).backward()
            with torch.enable_grad(), applied(modules, shifts):
                for (group, weight), reference in zip(kept, references):
                    n_kept = sum(int(r.shape[0]) for r in reference)
                    for mb, before in zip(group, reference):
                        log_probs = torch.log_softmax(answer_logits(model, mb)[0], -1)
                        drift = F.kl_div(log_probs, before, log_target=True, reduction="sum")
                        drift.mul(weight / n_kept).backward()
            shift_grads = [all_reduce(s.grad) for s in shifts]
            if refinement.preserve:  # d/dW of preserve * tr(dW^T C0 dW): the mean squared change on unrelated keys
                shift_grads = [g + 2 * refinement.preserve * (c0.to(g.dtype) @ s.detach() + a)
                               for g, c0, s, a in zip(shift_grads, unrelated, shifts, charged_applied)]
            grads = self.update.solve_grads(state.update_keys, residuals, log_lambdas, solved, shift_grads,
                                            all_reduce, factors)
            for residual, grad in zip(residuals, grads):
                residual.grad = grad.residuals.to(residual.dtype)
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
        solved, factors = solve(refinement.steps)
        return EditState(state.update_keys, state.residuals, residuals, solved, factors=factors)

    def edit_in_rounds(self, model: nn.Module, modules: Sequence[nn.Module], micro_batches, rounds: int = 1,
                       all_reduce: AllReduce = LOCAL, timer: StageTimer | None = None,
                       refinement: Refinement | None = None,
                       refinement_batches: RefinementBatches = NO_BATCHES) -> EditState:
        """Edit ``rounds`` times: each round captures on the model with the earlier rounds' shifts applied and adds
        its shifts to theirs. One round is :meth:`capture` + :meth:`param_shifts`. Each round is about as strong as
        the first (the hypernetwork normalises the value gradients it reads, and an edit's gradient stays large
        until it lands), so rounds add whole edits' shifts (docs/results: edit_quality_counterfact_dev_subject).
        The returned state holds the last round's keys and residuals and the summed ``param_shifts``. With a
        ``refinement`` (one round only) the residuals are refined on the edit prompts (:meth:`refine`), reading
        ``refinement_batches`` beside them."""
        if rounds < 1:
            raise ValueError(f"rounds must be at least 1, not {rounds}.")
        if refinement and rounds > 1:
            raise ValueError("Refining the residuals works on one round; use rounds=1.")
        stage = timer if timer is not None else (lambda name: nullcontext())
        total: list[torch.Tensor] | None = None
        for _ in range(rounds):
            with applied(modules, total) if total is not None else nullcontext(), stage("capture"):
                cap = self.capture(model, modules, micro_batches)
            state = self.param_shifts(cap, all_reduce, timer=timer)
            if refinement:
                with stage("refine"):
                    state = self.refine(model, modules, micro_batches, state, refinement, all_reduce,
                                        batches=refinement_batches)
            total = state.param_shifts if total is None else [t + s for t, s in zip(total, state.param_shifts)]
        state.param_shifts = total
        return state

    def backward(self, cap: Capture, state: EditState, shift_grads: Sequence[torch.Tensor],
                 all_reduce: AllReduce = LOCAL) -> None:
        """Accumulate hypernetwork gradients of the meta-loss, given the global ``G_W`` of each shift: through the
        solve (the update stage's closed form), the spread (autograd) and the hypernetwork (row chunks).

        Under DDP each process backpropagates its own rows; the parameter gradients are then summed
        across processes (``all_reduce``), and the lambda gradient, already global, is added once.
        """
        grads = self.update.solve_grads(state.update_keys, state.spread_residuals, self.log_lambdas(),
                                        [s.detach() for s in state.param_shifts], shift_grads, all_reduce,
                                        state.factors)
        d_residuals = self._through_spread(cap, state, [g.residuals for g in grads], all_reduce)
        self._through_hypernet(cap, state, d_residuals, [g.update_keys for g in grads])
        if all_reduce.is_distributed:
            for param in self.parameters():
                if param.grad is not None:
                    param.grad = all_reduce(param.grad)
        for position, grad in enumerate(g.log_lambda for g in grads):
            if self.learn_lambda and grad is not None:
                self.hypernet.add_log_lambda_grad(position, grad)

    def _through_spread(self, cap: Capture, state: EditState, d_spread: Sequence[torch.Tensor],
                        all_reduce: AllReduce) -> list[torch.Tensor]:
        """``dL/dR`` from ``dL/dR~``: autograd through the spread on the full residual tensors (N x d_out, small)."""
        leaves = [r.detach().requires_grad_(True) for r in state.residuals]
        with torch.enable_grad():
            spread = self.spread(leaves, cap.value_grads, all_reduce)
            found = torch.autograd.grad(spread, leaves, grad_outputs=d_spread, allow_unused=True)
        return [torch.zeros_like(leaf) if d is None else d for d, leaf in zip(found, leaves)]

    def _through_hypernet(self, cap: Capture, state: EditState, d_residuals: Sequence[torch.Tensor],
                          d_keys: Sequence[torch.Tensor | None]) -> None:
        """Backpropagate ``dL/dR`` (and ``dL/dK`` where the update keys are predicted) into the hypernetwork:
        through the kept graph, or chunk by chunk, recomputing each chunk's forward pass."""
        for position in range(self.n_modules):
            for start in range(0, cap.n_rows, self.chunk_size):
                rows = slice(start, start + self.chunk_size)
                with torch.enable_grad():
                    if state.graph is not None:
                        update_keys, residuals = state.graph[0][position], state.graph[1][position]
                    else:
                        update_keys, residuals = self._residual_rows(cap, position, rows)
                    surrogate = (d_residuals[position][rows] * residuals).sum()
                    if d_keys[position] is not None:
                        surrogate = surrogate + (d_keys[position][rows] * update_keys).sum()
                surrogate.backward()
