"""Sequential editors with one interface, so MOSE and the additive baselines run in the same loop.

- :class:`MoseEditor` (multiplicative): ``W = W0 Q^T`` with ``Q`` block-diagonal orthogonal, each block the
  Cayley transform of a skew matrix, trained per request with Adam; built on peft's OFT adapter.
- :class:`FineTuneEditor` (additive): ``W = W0 + dW`` on the same modules, trained the same way (same steps,
  lr, loss), with the FT-L constraint ``|dW - dW_before| <= norm_constraint`` element-wise per request.
- :class:`HorseTurnEditor` (additive): a trained HORSE editor applied turn by turn, each turn's shifts
  merged into the weights before the next; lifelong, each turn's solve also keeps earlier turns' keys.

Every editor exposes ``edit(micro_batches)`` (the ``edit`` view of one turn) and ``weights()``: the current
effective weight of each edited module in (d_out, d_in) layout, fp32, for the stability diagnostics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from horse_pl.data.tokenize import IGNORE_INDEX
from horse_pl.edit_modules import get_modules, layer_index, weight_in_out
from horse_pl.editing.editor import Refinement
from horse_pl.editing.key_stats import edit_key_sums
from horse_pl.editing.shifts import merge, shift_hook
from horse_pl.lm import answer_ce, replayed_below, unlanded_answer_ce

ADAPTER = "default"
REFRESH_ROWS = 32  # prompts per forward pass when a lifelong refresh recomputes the earlier turns' keys


def _freeze(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)


def _optimise(params: Sequence[torch.Tensor], model: nn.Module, micro_batches: Sequence[dict], steps: int, lr: float,
              after_step=None, optimizer: str = "adam", target: float = 1.0,
              penalty: Callable[[], torch.Tensor | None] | None = None, first_layer: int = 0) -> list[float]:
    """Per request (turn): a fresh optimiser (``adam`` or ``sgd``) on ``params`` for ``steps`` steps on the
    targets' NLL given the prompts. With ``target`` < 1 the loss is the token-mean NLL of the requests whose
    answer's geometric-mean probability is still below it, and the turn stops once every request reaches it;
    ``penalty()`` (a scalar, or None) is added to the loss at every step. ``params`` train only modules from
    decoder layer ``first_layer`` up, so the layers below it run once per prompt (:func:`replayed_below`)."""
    optimiser = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(params, lr=lr)
    n_tokens = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches)
    losses = []
    with replayed_below(model, first_layer):
        for _ in range(steps):
            optimiser.zero_grad(set_to_none=True)
            total = 0.0
            with torch.enable_grad():
                for mb in micro_batches:
                    loss = (answer_ce(model, mb) / len(micro_batches) if target >= 1 else
                            unlanded_answer_ce(model, mb, target) / max(n_tokens, 1))
                    loss.backward()
                    total += float(loss.detach())
                if target < 1 and total == 0:
                    break  # every request of the turn has landed
                extra = penalty() if penalty is not None else None
                if extra is not None:
                    extra.backward()
                    total += float(extra.detach())
            optimiser.step()
            if after_step is not None:
                after_step()
            losses.append(total)
    return losses


def _lowest_layer(edit_modules: Sequence[str]) -> int:
    """The lowest decoder layer an editor trains (0 where a name carries no layer number)."""
    try:
        return min(layer_index(name) for name in edit_modules)
    except ValueError:
        return 0


def rotation_output_energy(weight: torch.Tensor, blocks: torch.Tensor, reference: torch.Tensor | None,
                           moments: torch.Tensor) -> torch.Tensor:
    """``tr(D M D^T)`` for ``D = W0 (Q - Q_ref)^T``: the mean squared change of a rotated layer's outputs on keys
    with second moment ``M``. ``weight`` is ``W0`` (d_out, d_in), ``blocks`` the diagonal blocks (r, n, n) of the
    block-diagonal ``Q`` (the layer computes ``W0 Q^T x``), ``reference`` those of ``Q_ref`` (None: the identity,
    so ``D = W - W0``)."""
    r, n, _ = blocks.shape
    change = blocks - (torch.eye(n, dtype=blocks.dtype) if reference is None else reference)
    shift = torch.einsum("orj,rkj->ork", weight.view(weight.shape[0], r, n), change).reshape(weight.shape)
    return shift_energy(shift, moments)


class MoseEditor:
    """MOSE, released variant, on peft's OFT adapter (``coft=True``, exact Cayley, no Neumann series).

    Args:
        model: the LM; OFT layers are injected into it in place (the model stays a plain causal LM).
        edit_modules: names of the edited linear layers (down-projections).
        n_blocks: blocks of ``Q`` per layer (``r``); the block size is ``d_in / n_blocks``.
        steps, lr: optimiser steps and learning rate per request.
        radius_scale: the Frobenius ball radius is ``radius_scale * n^2 / sqrt(n_blocks)`` (n = block size), the
            released formula, set for 7B block sizes.
        reference_block: scale the ball to the model: ``radius_scale * n * reference_block / sqrt(n_blocks)``, the
            per-entry bound ``radius / n`` the released formula gives a block of ``reference_block`` (2752: a
            LLaMA-2-7B down-projection in 4 blocks). None: the released formula as it is.
        optimizer: ``adam`` (released) or ``sgd``. Adam moves every entry of the skew matrices by about ``lr`` per
            step whatever its gradient, so one request fills the whole ball; plain gradient steps stay in the few
            directions the request's keys span.
        target: a request whose answer's geometric-mean probability reaches it stops pulling, and the turn stops
            when all have (1: every step runs, the released behaviour).
        preserve: weight of ``sum_l tr(D_l C0_l D_l^T) / tr(W0_l C0_l W0_l^T)`` in each step's loss, ``D = W - W0``:
            the relative mean squared change of every edited layer's outputs on unrelated text (``C0``, its keys'
            second moment, ``key_moments``) since the unedited model.
        keep_edits: weight of the same relative change caused by this turn alone (``Q`` against ``Q`` at the start of
            the turn) on the keys of every earlier turn's edit prompts (the sum of each turn's key second moment):
            a new edit's rotation pays for moving the earlier edits' outputs.
        key_moments: ``C0`` of each edit module (d_in, d_in), needed for ``preserve`` and ``keep_edits``.
    """

    name = "mose"

    def __init__(self, model: nn.Module, edit_modules: Sequence[str], n_blocks: int = 4, steps: int = 20,
                 lr: float = 5e-4, radius_scale: float = 1e-5, reference_block: int | None = None,
                 optimizer: str = "adam", target: float = 1.0, preserve: float = 0.0, keep_edits: float = 0.0,
                 key_moments: Sequence[torch.Tensor] | None = None):
        from peft import OFTConfig, inject_adapter_in_model

        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"MOSE optimizer must be 'adam' or 'sgd', not '{optimizer}'.")
        if not 0 < target <= 1:
            raise ValueError(f"MOSE target must be a probability in (0, 1], not {target}.")
        if preserve < 0 or keep_edits < 0:
            raise ValueError(f"MOSE preserve and keep_edits must be at least 0, not {preserve} and {keep_edits}.")
        if (preserve or keep_edits) and key_moments is None:
            raise ValueError("MOSE preserve and keep_edits need the edit modules' key moments on unrelated text "
                             "(key_moments); the sequential runner computes them from --general-data.")
        self.model, self.edit_modules = model, list(edit_modules)
        self.steps, self.lr, self.optimizer, self.target = steps, lr, optimizer, target
        self.preserve, self.keep_edits = preserve, keep_edits
        base = get_modules(model, self.edit_modules)
        for name, module in zip(self.edit_modules, base):
            if not isinstance(module, nn.Linear) or module.in_features % n_blocks:
                raise ValueError(f"MOSE needs nn.Linear edit modules whose input size divides into n_blocks={n_blocks} "
                                 f"blocks; '{name}' is {type(module).__name__} with input size "
                                 f"{getattr(module, 'in_features', '?')}; choose other edit_modules or n_blocks.")
        self.original = [m.weight.detach().float().clone() for m in base]
        if reference_block is not None and reference_block < 1:
            raise ValueError(f"MOSE reference_block must be a positive block size, not {reference_block}.")
        block = base[0].in_features // n_blocks
        # peft projects onto the ball of radius eps / sqrt(r); MOSE's radius is radius_scale * n^2 / sqrt(r)
        # (released) or radius_scale * n * reference_block / sqrt(r) (scaled to the block)
        eps = radius_scale * block * (reference_block or block)
        config = OFTConfig(r=n_blocks, oft_block_size=0, target_modules=self.edit_modules, coft=True,
                           eps=eps, use_cayley_neumann=False, init_weights=True,
                           module_dropout=0.0, bias="none")
        _freeze(model)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        self.layers = get_modules(model, self.edit_modules)
        self.params = [layer.oft_R[ADAPTER].weight for layer in self.layers]
        for param in self.params:
            param.requires_grad_(True)
        self.radius = [eps / math.sqrt(n_blocks) for _ in self.layers]
        self.key_moments = [m.float() for m in key_moments] if key_moments is not None else None
        # each layer's output energy on unrelated text, the unit of the preservation charges
        self.unrelated_energy = (output_change_energy(self.original, self.key_moments)
                                 if self.key_moments is not None else None)
        self.edit_moments: list[torch.Tensor] | None = None  # sum over earlier turns of their prompts' key moments

    def _blocks(self) -> list[torch.Tensor]:
        """The diagonal blocks (r, n, n) of every edited layer's ``Q``, differentiable in the skew parameters."""
        rotations = [layer.oft_R[ADAPTER] for layer in self.layers]
        return [rot._cayley_batch(rot.weight, rot.block_size, False) for rot in rotations]

    def _charge(self, moments: Sequence[torch.Tensor], reference: Sequence[torch.Tensor] | None,
                blocks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """The relative output change on keys with second moments ``moments``, summed over the edited layers, of
        ``Q`` (``blocks``, default the current ones) against ``reference`` (the blocks at some earlier point; None:
        the unedited model)."""
        references = reference if reference is not None else [None] * len(self.layers)
        return sum(rotation_output_energy(w0, q, ref, m) / e0 for w0, q, ref, m, e0 in
                   zip(self.original, blocks or self._blocks(), references, moments, self.unrelated_energy))

    def edit(self, micro_batches: Sequence[dict]) -> list[float]:
        start = [q.detach() for q in self._blocks()] if self.keep_edits else None

        def penalty():
            keep = self.keep_edits and self.edit_moments is not None
            if not (self.preserve or keep):
                return None
            blocks = self._blocks()  # one Cayley transform per step for both charges
            charges = []
            if self.preserve:
                charges.append(self.preserve * self._charge(self.key_moments, None, blocks))
            if keep:
                charges.append(self.keep_edits * self._charge(self.edit_moments, start, blocks))
            return sum(charges)
        losses = _optimise(self.params, self.model, micro_batches, self.steps, self.lr, optimizer=self.optimizer,
                           target=self.target, penalty=penalty, first_layer=_lowest_layer(self.edit_modules))
        if self.keep_edits:
            self._remember(micro_batches)
        return losses

    @torch.no_grad()
    def _remember(self, micro_batches: Sequence[dict]) -> None:
        """Add this turn's edit prompts' key second moment (every non-padding token) to the earlier edits'."""
        sums = edit_key_sums(self.model, self.layers, micro_batches, "all")
        n_tokens = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
        moments = [s.float() / n_tokens for s in sums]
        self.edit_moments = (moments if self.edit_moments is None else
                             [m + new for m, new in zip(self.edit_moments, moments)])

    @torch.no_grad()
    def rotations(self) -> list[torch.Tensor]:
        """``Q`` of every edited layer (d_in x d_in, block-diagonal), after the ball projection."""
        return [layer.oft_R[ADAPTER].get_weight().float() for layer in self.layers]

    @torch.no_grad()
    def weights(self) -> list[torch.Tensor]:
        # The adapter computes base(x Q): the effective weight is W0 Q^T.
        return [w0 @ q.T for w0, q in zip(self.original, self.rotations())]

    @torch.no_grad()
    def skew_norms(self) -> list[torch.Tensor]:
        """Per layer, the Frobenius norm of each block's skew matrix (the quantity peft's ball bounds)."""
        out = []
        for layer in self.layers:
            rot = layer.oft_R[ADAPTER]
            out.append(torch.linalg.matrix_norm(rot._pytorch_skew_symmetric(rot.weight, rot.block_size)))
        return out

    @torch.no_grad()
    def diagnostics(self) -> dict[str, list[float]]:
        return {"orthogonality_error": [float(torch.linalg.matrix_norm(q.T @ q - torch.eye(q.shape[0])))
                                        for q in self.rotations()]}


class FineTuneEditor:
    """Constrained fine-tuning (FT-L) of the same modules: ``W = W0 + dW``, ``dW`` an fp32 side tensor.

    Each request's Adam steps may move every entry of ``dW`` by at most ``norm_constraint`` from where the
    request started (``None``: unconstrained), the constraint of ROME's FT-L baseline.
    """

    name = "ft"

    def __init__(self, model: nn.Module, edit_modules: Sequence[str], steps: int = 20, lr: float = 5e-4,
                 norm_constraint: float | None = 5e-4):
        self.model, self.edit_modules = model, list(edit_modules)
        self.steps, self.lr, self.norm_constraint = steps, lr, norm_constraint
        _freeze(model)
        self.layers = get_modules(model, self.edit_modules)
        self.original = [weight_in_out(m).detach().T.float().clone() for m in self.layers]  # (d_out, d_in)
        self.shifts = [torch.zeros(w.shape[1], w.shape[0], requires_grad=True) for w in self.original]  # (d_in, d_out)
        self._handles = [m.register_forward_hook(shift_hook(s)) for m, s in zip(self.layers, self.shifts)]

    def edit(self, micro_batches: Sequence[dict]) -> list[float]:
        start = [s.detach().clone() for s in self.shifts]

        @torch.no_grad()
        def clamp():
            if self.norm_constraint is not None:
                for shift, s0 in zip(self.shifts, start):
                    shift.copy_(torch.clamp(shift, s0 - self.norm_constraint, s0 + self.norm_constraint))
        return _optimise(self.shifts, self.model, micro_batches, self.steps, self.lr, clamp,
                         first_layer=_lowest_layer(self.edit_modules))

    @torch.no_grad()
    def weights(self) -> list[torch.Tensor]:
        return [w0 + s.detach().T for w0, s in zip(self.original, self.shifts)]

    def diagnostics(self) -> dict[str, list[float]]:
        return {}


class HorseTurnEditor:
    """A trained HORSE/MALMEN editor applied turn by turn: each turn's shifts are computed on the current
    (already edited) model with the same capture/predict/spread/solve code as training, then merged.

    Plain (``keep_edits=0``, ``preserve=None``) each turn's solve knows nothing of earlier turns. Lifelong
    (``keep_edits > 0`` or ``preserve``), each edit module's solve gets the preservation matrix
    ``mu C0 + nu sum_{earlier turns} K^T K``: ``C0`` the second moment of its keys on unrelated text (weight
    ``preserve``), ``K`` the update keys of every earlier turn (weight ``keep_edits``), so a turn's least squares
    also keeps the module's outputs on earlier edits' keys (MEMIT's sequential form; one row of an earlier edit
    weighs ``keep_edits`` rows of this turn's residual fit). An editor with ``preserve_facts`` adds ``mu_f F`` (the
    keys at known facts' answers, bound on the editor) to every turn's solve, plain or lifelong.

    A ``refinement`` refines each turn's residuals on that turn's edit prompts through the turn's own solve
    (:meth:`horse_pl.editing.editor.Editor.refine`), so a lifelong turn's refined shifts still keep the earlier
    turns' keys; its ``preserve`` charges the output change on unrelated text's keys (``key_moments``): the turn's
    own, or with ``anchor`` the total shift's ``W - W0``, so each turn pays for the drift it adds to earlier turns'.

    Edits to a lower edit module move the keys of every module above it, so ``C0`` and the earlier turns' ``K^T K``
    go stale as turns accumulate. With ``moments_now`` (``C0`` recomputed on the model as it is) the lifelong
    diagnostics report how far: ``c0_staleness`` and ``memory_staleness``, ``||M_now - M_bound||_F / ||M_bound||_F``
    per module; ``refresh_every`` = R recomputes both on the current model every R turns, so a turn's solve keeps
    the outputs the edited model has now (on unrelated text and on every earlier edit prompt). With
    ``heldout_moments_now`` (the key moments of held-out text, e.g. the perplexity sample) they also report how much
    each module's total shift ``D = W - W0`` changes its outputs, per token, relative to the unedited outputs:
    ``drift_energy_c0`` = ``tr(D C0 D^T) / tr(W0 C0 W0^T)`` (what the solve's ``C0`` term sees) and
    ``drift_energy_heldout``, the same on the held-out keys; held-out energy far above ``C0``'s means the shifts
    sit in directions ``C0`` under-samples. ``turn_energy_sum_c0`` sums each turn's own ``tr(dW_t C0 dW_t^T)`` (on the
    ``C0`` bound at that turn, same reference): a total above it means the turns' shifts pile up in shared
    directions, below it that later turns undo earlier ones.

    Args:
        key_moments: ``C0`` of each edit module (needed when ``preserve`` > 0 or the refinement's ``preserve`` > 0).
        keep_edits: ``nu``, weight of the earlier turns' keys (0: forget them).
        preserve: ``mu``; None keeps the editor's own preservation weight (and its ``C0``).
        refinement: refine each turn's residuals (default none: the hypernetwork's one step).
        anchor: the refinement's ``preserve`` charges the total shift ``W - W0`` (with this turn's), not only the
            turn's own (needs a refinement with ``preserve`` > 0).
        moments_now: computes ``C0`` of the edit modules on the model as it is now (lifelong diagnostics, refresh).
        refresh_every: lifelong: recompute ``C0`` and the earlier turns' keys on the current model every this many
            turns (0: never; they stay as computed on the model of their own turn).
        refresh_c0_every: recompute ``C0`` every this many turns instead (None: with the keys, every
            ``refresh_every`` turns; 0: never). ``C0`` moves slowly and costs a pass over the preservation texts.
        heldout_moments_now: computes the edit modules' key moments on held-out text on the model as it is now
            (the drift-energy diagnostics; needs ``moments_now``).
    """

    name = "horse"

    def __init__(self, model: nn.Module, editor: nn.Module, edit_modules: Sequence[str], keep_edits: float = 0.0,
                 preserve: float | None = None, key_moments: Sequence[torch.Tensor] | None = None,
                 refinement: Refinement | None = None,
                 moments_now: Callable[[], Sequence[torch.Tensor]] | None = None, refresh_every: int = 0,
                 heldout_moments_now: Callable[[], Sequence[torch.Tensor]] | None = None,
                 refresh_c0_every: int | None = None, anchor: bool = False):
        if keep_edits < 0 or (preserve is not None and preserve < 0):
            raise ValueError(f"keep_edits ({keep_edits}) and preserve ({preserve}) must be at least 0.")
        if refresh_every < 0 or (refresh_c0_every is not None and refresh_c0_every < 0):
            raise ValueError(f"refresh_every ({refresh_every}) and refresh_c0_every ({refresh_c0_every}) must be at "
                             "least 0 (0: never refresh).")
        refresh_c0_every = refresh_every if refresh_c0_every is None else refresh_c0_every
        if refinement and refinement.preserve and key_moments is None:
            raise ValueError(f"A refinement with preserve={refinement.preserve} needs the edit modules' key moments "
                             "(horse_pl.editing.key_stats.cached_key_moments).")
        if anchor and not (refinement and refinement.preserve):
            raise ValueError("anchor charges the refinement's preserve on W - W0: it needs a refinement with "
                             "preserve > 0.")
        self.anchor = anchor
        self.model, self.editor, self.edit_modules = model, editor, list(edit_modules)
        _freeze(model)
        self.layers = get_modules(model, self.edit_modules)
        self.original = [weight_in_out(m).detach().T.float().clone() for m in self.layers]
        self.refinement = refinement
        self.unrelated = ([m.float().to(w.device) for m, w in zip(key_moments, self.original)]
                          if key_moments is not None else None)
        self.lifelong = keep_edits > 0 or preserve is not None
        own = getattr(editor.update, "preserve", None)
        if self.lifelong and own is None:
            raise ValueError(f"Lifelong editing needs an editor with a closed-form solve; '{editor.update.name}' "
                             "(MEND's outer product) has none: use a HORSE or MALMEN editor.")
        if (refresh_every or refresh_c0_every) and not (self.lifelong and moments_now is not None):
            raise ValueError(f"refresh_every={refresh_every} and refresh_c0_every={refresh_c0_every} refresh a "
                             "lifelong solve's earlier keys and C0: they need keep_edits > 0 or preserve, and "
                             "moments_now.")
        self.keep_edits = keep_edits
        self.preserve = own if preserve is None else preserve
        self.moments_now, self.refresh_every, self.refresh_c0_every = moments_now, refresh_every, refresh_c0_every
        self.heldout_moments_now = heldout_moments_now
        self.memory: list[torch.Tensor] = []
        self.turn_energies: list[float] = []  # per module, sum over turns of tr(dW_t C0 dW_t^T) on the bound C0
        self.turn_batches: list[Sequence[dict]] = []  # every lifelong turn's edit prompts, to recompute their keys
        self.c0: list[torch.Tensor] | None = None
        if self.lifelong:
            if self.preserve and key_moments is None:
                raise ValueError(f"Lifelong HORSE with preserve={self.preserve} needs the edit modules' key moments "
                                 "(horse_pl.editing.key_stats.cached_key_moments).")
            self.c0 = self.unrelated if self.preserve else None
            update = editor.update
            # the solve's preservation matrix becomes mu C0 + nu sum K^T K (bound before every turn), weight 1
            editor.update = type(update)(**{**update.init_args(), "preserve": 1.0})
            self.memory = [torch.zeros(d_in, d_in, dtype=torch.float64) for d_in, _ in editor.hypernet.shapes]
            self.name = "horse_lifelong"

    def _bind_preservation(self) -> None:
        matrices = []
        for position, memory in enumerate(self.memory):
            matrix = self.keep_edits * memory.float()
            if self.c0 is not None:
                matrix = matrix + self.preserve * self.c0[position]
            matrices.append(matrix.to(self.original[position].device))
        self.editor.bind_key_moments(matrices)

    def edit(self, micro_batches: Sequence[dict]) -> list[float]:
        cap = self.editor.capture(self.model, self.layers, micro_batches)
        if self.lifelong:
            self._bind_preservation()
        with torch.no_grad():
            state = self.editor.param_shifts(cap)
        if self.refinement:
            applied = [d.T for d in self.drifts()] if self.anchor else None
            state = self.editor.refine(self.model, self.layers, micro_batches, state, self.refinement,
                                       unrelated_moments=self.unrelated, applied_shifts=applied)
        merge(self.layers, state.param_shifts)
        bound_c0 = self.c0 if self.c0 is not None else self.unrelated
        if self.heldout_moments_now is not None and bound_c0 is not None:  # each turn's own output change, for the
            # drift diagnostics to compare with the total's (coherence)
            turn = output_change_energy([s.detach().T for s in state.param_shifts], bound_c0)
            self.turn_energies = [a + b for a, b in zip(self.turn_energies, turn)] if self.turn_energies else turn
        for memory, keys in zip(self.memory, state.update_keys):
            keys = keys.detach().to(memory.device, torch.float64)
            memory += keys.T @ keys
        if self.lifelong:
            self.turn_batches.append(micro_batches)
            turns = len(self.turn_batches)
            keys = bool(self.refresh_every) and turns % self.refresh_every == 0
            c0 = bool(self.refresh_c0_every) and turns % self.refresh_c0_every == 0
            if keys or c0:
                self.refresh(keys=keys, c0=c0)
        return [cap.loss]

    def _moments_now(self, keys: bool = True, c0: bool = True,
                     ) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """``C0`` (None without a C0 term or if not asked) and the earlier turns' ``sum K^T K`` (None if not asked),
        recomputed on the current model."""
        c0 = ([m.float().to(w.device) for m, w in zip(self.moments_now(), self.original)]
              if c0 and self.c0 is not None else None)
        if not keys:
            return c0, None
        # every earlier turn's prompts in batches of REFRESH_ROWS (one pass per turn would make a refresh after T
        # small turns cost T passes)
        sums = edit_key_sums(self.model, self.layers, [mb for turn in self.turn_batches for mb in turn],
                             self.editor.positions, rows=REFRESH_ROWS)
        return c0, [torch.zeros_like(m) if s is None else s.to(m.device, m.dtype) for s, m in zip(sums, self.memory)]

    def refresh(self, keys: bool = True, c0: bool = True) -> None:
        """Recompute the earlier turns' keys and ``C0`` on the model as it is now: later solves keep its outputs."""
        c0, memory = self._moments_now(keys, c0)
        if memory is not None:
            self.memory = memory
        if c0 is not None:
            self.c0 = c0
            if self.unrelated is not None:
                self.unrelated = c0

    @torch.no_grad()
    def weights(self) -> list[torch.Tensor]:
        return [weight_in_out(m).detach().T.float().clone() for m in self.layers]

    def drifts(self) -> list[torch.Tensor]:
        """Each module's total shift ``W - W0``, (d_out, d_in)."""
        return [w - w0 for w, w0 in zip(self.weights(), self.original)]

    def diagnostics(self) -> dict[str, list[float]]:
        """Lifelong with ``moments_now``: how stale the bound ``C0`` and earlier-turn keys are on the current model."""
        if not (self.lifelong and self.moments_now is not None):
            return {}

        def staleness(now: Sequence[torch.Tensor], bound: Sequence[torch.Tensor]) -> list[float]:
            out = []
            for n, b in zip(now, bound):
                norm = float(torch.linalg.matrix_norm(b.double()))
                out.append(float(torch.linalg.matrix_norm(n.double() - b.double())) / norm if norm > 0 else 0.0)
            return out

        c0, memory = self._moments_now()
        out = {"memory_staleness": staleness(memory, self.memory)}
        if c0 is not None:
            out["c0_staleness"] = staleness(c0, self.c0)
        if self.heldout_moments_now is not None:
            drifts = self.drifts()
            c0 = c0 if c0 is not None else [m.float() for m in self.moments_now()]
            heldout = [m.float() for m in self.heldout_moments_now()]
            reference = {"c0": output_change_energy(self.original, c0),
                         "heldout": output_change_energy(self.original, heldout)}
            for name, moments in (("c0", c0), ("heldout", heldout)):
                out[f"drift_energy_{name}"] = [e / e0 for e, e0 in zip(output_change_energy(drifts, moments),
                                                                      reference[name])]
            if self.turn_energies:  # the turns' own energies summed: below the total's when turns pile up
                out["turn_energy_sum_c0"] = [e / e0 for e, e0 in zip(self.turn_energies, reference["c0"])]
        return out


def shift_energy(shift: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
    """The mean squared output change ``tr(D C D^T) = mean_t ||D k_t||^2`` that a weight shift ``D`` (d_out, d_in)
    makes on keys with second moment ``C`` (d_in, d_in); differentiable in ``D``."""
    return ((shift @ moments) * shift).sum()


@torch.no_grad()
def output_change_energy(shifts: Sequence[torch.Tensor], moments: Sequence[torch.Tensor]) -> list[float]:
    """Per module, :func:`shift_energy` in fp64 (diagnostics)."""
    return [float(shift_energy(d.double(), c.to(d.device).double())) for d, c in zip(shifts, moments)]


@torch.no_grad()
def stability(weights: Sequence[torch.Tensor], original: Sequence[torch.Tensor]) -> dict[str, list[float]]:
    """Per edited matrix: condition number ``sigma_max / sigma_min``, ``||W||_F`` and ``||W - W0||_F``."""
    out: dict[str, list[float]] = {"condition_number": [], "frobenius_norm": [], "drift": []}
    for w, w0 in zip(weights, original):
        sigma = torch.linalg.svdvals(w.double())
        out["condition_number"].append(float(sigma[0] / sigma[-1]))
        out["frobenius_norm"].append(float(torch.linalg.matrix_norm(w)))
        out["drift"].append(float(torch.linalg.matrix_norm(w - w0)))
    return out
