"""Edit-strength probes. Editing in rounds (``rounds=R``): each round is the editor's own capture + solve on the model
the earlier rounds edited, and the shifts add up. Scaling the per-layer lr (``scale=S``): the shifts scale by S."""

import pytest
import torch
from conftest import small_zsre

from horse_pl.data.batch import edit_batch
from horse_pl.data.records import load_requests
from horse_pl.edit_modules import get_modules, resolve_edit_modules, weight_in_out, weight_shape
from horse_pl.editing.editor import Editor, Refinement, RefinementBatches
from horse_pl.editing.shifts import applied, output_energy, relative_output_change
from horse_pl.models import load_model


def _setup(tiny_llama, n_requests: int, batch_size: int):
    """The tiny model, its last two layers' MLP outputs as edit modules, and the edit view of a few zsRE requests."""
    model, tok = load_model(tiny_llama)
    modules = get_modules(model, resolve_edit_modules(model, "last:2"))
    requests, _ = load_requests(small_zsre()[0], "zsre", skip_invalid=True, limit=n_requests)
    micro_batches = edit_batch(tok, requests, ("edit",), batch_size=batch_size, max_length=1024)["edit"].micro_batches
    torch.manual_seed(0)
    return model, modules, micro_batches


def test_each_round_is_a_capture_and_solve_on_the_model_the_earlier_rounds_edited(tiny_llama):
    model, modules, micro_batches = _setup(tiny_llama, 6, 3)
    editor = Editor([weight_shape(m) for m in modules], rank=8, lr=500.0)
    for p in editor.parameters():
        p.data.add_(0.05 * torch.randn_like(p))

    first = editor.param_shifts(editor.capture(model, modules, micro_batches)).param_shifts
    for got, want in zip(editor.edit_in_rounds(model, modules, micro_batches, 1).param_shifts, first):
        torch.testing.assert_close(got, want)
    with applied(modules, first):
        cap = editor.capture(model, modules, micro_batches)
    second = editor.param_shifts(cap).param_shifts
    two = editor.edit_in_rounds(model, modules, micro_batches, 2).param_shifts
    for got, a, b in zip(two, first, second):
        torch.testing.assert_close(got, a + b)
        assert (a - b).norm() > 1e-2 * a.norm()  # the second round sees the edited model
    with pytest.raises(ValueError, match="at least 1"):
        editor.edit_in_rounds(model, modules, micro_batches, 0)


@pytest.mark.parametrize("spread", ["GramSchmidtSpread", "NoSpread"])
def test_scaling_the_lr_scales_the_shifts(tiny_llama, spread):
    """Residuals are linear in lr, the spread is scale-equivariant and the solve is linear in the residuals."""
    from horse_pl.editing import spread as spreads

    model, modules, micro_batches = _setup(tiny_llama, 4, 2)
    editor = Editor([weight_shape(m) for m in modules], rank=8, lr=500.0, spread=getattr(spreads, spread)())
    cap = editor.capture(model, modules, micro_batches)
    base = editor.param_shifts(cap).param_shifts
    editor.hypernet.scale_lr(3.0)
    for got, want in zip(editor.param_shifts(cap).param_shifts, base):
        torch.testing.assert_close(got, 3.0 * want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    with pytest.raises(ValueError, match="positive"):
        editor.hypernet.scale_lr(0.0)


def test_refining_the_residuals_lowers_the_edit_loss_through_the_solve(tiny_llama):
    """``refine``: Adam steps on the spread residuals against the edit prompts' loss with the solved shifts applied;
    the shifts stay the update stage's solve of the refined residuals, and the edit loss falls."""
    from horse_pl.editing.update import JointClosedFormUpdate
    from horse_pl.lm.passes import answer_ce

    model, modules, micro_batches = _setup(tiny_llama, 4, 2)
    editor = Editor([weight_shape(m) for m in modules], rank=8, lr=50.0, update=JointClosedFormUpdate())

    def edit_loss(shifts) -> float:
        with torch.no_grad(), applied(modules, shifts):
            return sum(float(answer_ce(model, mb)) for mb in micro_batches)

    state = editor.param_shifts(editor.capture(model, modules, micro_batches))
    assert editor.refine(model, modules, micro_batches, state, Refinement(0)) is state
    refined = editor.refine(model, modules, micro_batches, state, Refinement(steps=5, lr=0.5))
    assert edit_loss(refined.param_shifts) < edit_loss(state.param_shifts) - 1e-3
    again, _ = editor.update.solve(refined.update_keys, refined.spread_residuals, editor.log_lambdas())
    for got, want in zip(refined.param_shifts, again):
        torch.testing.assert_close(got, want)
    for before, after in zip(state.spread_residuals, refined.spread_residuals):
        assert (after - before).norm() > 0
    via_rounds = editor.edit_in_rounds(model, modules, micro_batches, refinement=Refinement(steps=5, lr=0.5))
    for got, want in zip(via_rounds.param_shifts, refined.param_shifts):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="one round"):
        editor.edit_in_rounds(model, modules, micro_batches, rounds=2, refinement=Refinement(1))
    # every request counts as landed at a target it has already passed: nothing pulls, nothing moves
    still = editor.refine(model, modules, micro_batches, state, Refinement(steps=2, lr=0.5, target=1e-30))
    for before, after in zip(state.spread_residuals, still.spread_residuals):
        torch.testing.assert_close(after, before)
    for bad, words in (({"target": 0.0}, "probability"), ({"lr": 0.0}, "positive"), ({"steps": -1}, "at least 0"),
                       ({"preserve": -1.0}, "at least 0")):
        with pytest.raises(ValueError, match=words):
            Refinement(**{"steps": 1, **bad})
    with pytest.raises(ValueError, match="key moments"):  # this editor has no C0 bound
        editor.refine(model, modules, micro_batches, state, Refinement(steps=1, preserve=1.0))


def test_context_prefixes_are_the_model_s_own_seeded_texts_before_each_prompt(tiny_llama):
    from horse_pl.data.prefixes import context_prefixes, with_prefixes
    from horse_pl.data.records import EditRequest

    model, tok = load_model(tiny_llama)
    prefixes = context_prefixes(model, tok, 3, n_tokens=4)
    assert len(prefixes) == 3 and all(p.endswith(".") and p.strip() for p in prefixes)
    assert context_prefixes(model, tok, 3, n_tokens=4) == prefixes  # seeded: the same texts every time
    assert context_prefixes(model, tok, 3, n_tokens=4, seed=1) != prefixes
    assert context_prefixes(model, tok, 0) == []
    torch.manual_seed(5)
    drawn = torch.rand(1)
    torch.manual_seed(5)
    context_prefixes(model, tok, 1, n_tokens=2)
    assert torch.equal(torch.rand(1), drawn)  # the caller's random stream is left as it was
    with pytest.raises(ValueError, match="at least 0"):
        context_prefixes(model, tok, -1)
    requests = [EditRequest("a?", "x", subject="a"), EditRequest("b?", "y")]
    placed = with_prefixes(requests, ["P.", "Q."])
    assert [r.prompt for r in placed] == ["P. a?", "P. b?", "Q. a?", "Q. b?"]
    assert [(r.target, r.subject) for r in placed] == [("x", "a"), ("y", None)] * 2


def test_the_refined_loss_reads_the_context_batches_beside_the_edit_prompts(tiny_llama):
    """``context_batches`` join the refined loss as more answer tokens of one mean: the edit prompts once more as
    their own context give the refinement without them; prompts behind other texts move it."""
    from horse_pl.data.prefixes import with_prefixes
    from horse_pl.editing.update import JointClosedFormUpdate

    model, modules, micro_batches = _setup(tiny_llama, 4, 2)
    model_tok = load_model(tiny_llama)[1]
    editor = Editor([weight_shape(m) for m in modules], rank=8, lr=50.0, update=JointClosedFormUpdate())
    state = editor.param_shifts(editor.capture(model, modules, micro_batches))
    alone = editor.refine(model, modules, micro_batches, state, Refinement(steps=3, lr=0.5))
    twice = editor.refine(model, modules, micro_batches, state, Refinement(steps=3, lr=0.5, prefixes=1),
                          batches=RefinementBatches(context=micro_batches))
    for got, want in zip(twice.param_shifts, alone.param_shifts):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    requests, _ = load_requests(small_zsre()[0], "zsre", skip_invalid=True, limit=4)
    prefixed = edit_batch(model_tok, with_prefixes(requests, ["Once upon a time."]), ("edit",), batch_size=2,
                          max_length=1024)["edit"].micro_batches
    behind = editor.refine(model, modules, micro_batches, state, Refinement(steps=3, lr=0.5, prefixes=1),
                           batches=RefinementBatches(context=prefixed))
    assert any((a - b).norm() > 1e-3 * b.norm() for a, b in zip(behind.param_shifts, alone.param_shifts))
    with pytest.raises(ValueError, match="RefinementBatches.context"):  # prefixes asked for, none given
        editor.refine(model, modules, micro_batches, state, Refinement(steps=1, prefixes=2))
    with pytest.raises(ValueError, match="RefinementBatches.context"):  # given, not asked for
        editor.refine(model, modules, micro_batches, state, Refinement(steps=1),
                      batches=RefinementBatches(context=prefixed))
    with pytest.raises(ValueError, match="at least 0"):
        Refinement(steps=1, prefixes=-1)


@pytest.mark.parametrize("term", ["locality", "general"])
def test_the_refinement_s_kl_terms_keep_the_unrelated_distributions(tiny_llama, term):
    """``Refinement.locality`` / ``general``: the KL from the distributions before the refinement to those after it, at
    the answers of unrelated questions (anchors) or at every token of plain text (texts), joins the refined loss; a
    strong weight keeps them closer than none, and each term needs its batches."""
    import torch.nn.functional as F

    from horse_pl.data.batch import text_batches
    from horse_pl.editing.update import JointClosedFormUpdate
    from horse_pl.lm.passes import answer_logits

    model, modules, micro_batches = _setup(tiny_llama, 4, 2)
    tok = load_model(tiny_llama)[1]
    requests, _ = load_requests(small_zsre()[0], "zsre", skip_invalid=True, limit=12)
    if term == "locality":
        kept_batches = edit_batch(tok, requests[4:], ("locality",), batch_size=4,
                                  max_length=1024)["locality"].micro_batches
        given = RefinementBatches(anchors=kept_batches)
    else:
        kept_batches = text_batches(tok, ["The river runs past the old mill and into the sea.",
                                          "Question: who wrote it?\nAnswer: a friend of hers", ""], batch_size=2)
        assert sum(int(mb["input_ids"].shape[0]) for mb in kept_batches) == 2  # an empty text has nothing to predict
        given = RefinementBatches(texts=kept_batches)
    editor = Editor([weight_shape(m) for m in modules], rank=8, lr=50.0, update=JointClosedFormUpdate())
    state = editor.param_shifts(editor.capture(model, modules, micro_batches))

    def drift(shifts) -> float:
        with torch.no_grad():
            before = [torch.log_softmax(answer_logits(model, mb)[0], -1) for mb in kept_batches]
            with applied(modules, shifts):
                return sum(float(F.kl_div(torch.log_softmax(answer_logits(model, mb)[0], -1), b, log_target=True,
                                          reduction="sum")) for mb, b in zip(kept_batches, before))

    free = editor.refine(model, modules, micro_batches, state, Refinement(steps=5, lr=0.5))
    kept = editor.refine(model, modules, micro_batches, state, Refinement(steps=5, lr=0.5, **{term: 1e5}),
                         batches=given)
    assert drift(kept.param_shifts) < 0.5 * drift(free.param_shifts)
    field = "anchors" if term == "locality" else "texts"
    with pytest.raises(ValueError, match=f"RefinementBatches.{field}"):
        editor.refine(model, modules, micro_batches, state, Refinement(steps=1, **{term: 1.0}))
    with pytest.raises(ValueError, match=f"RefinementBatches.{field}"):
        editor.refine(model, modules, micro_batches, state, Refinement(steps=1), batches=given)
    with pytest.raises(ValueError, match="at least 0"):
        Refinement(steps=1, **{term: -1.0})


def test_the_refinement_penalty_keeps_the_shifts_smaller_on_unrelated_keys(tiny_llama):
    """``preserve``: the refined loss adds tr(dW^T C0 dW); with a large weight the refined shifts move unrelated keys'
    outputs (measured in C0) less than without it."""
    model, modules, micro_batches = _setup(tiny_llama, 4, 2)
    editor = Editor([weight_shape(m) for m in modules], rank=8, lr=50.0)
    moments = [torch.eye(m.weight.shape[1]) + 0.1 * torch.ones(m.weight.shape[1], m.weight.shape[1]) for m in modules]
    editor.bind_key_moments(moments)
    state = editor.param_shifts(editor.capture(model, modules, micro_batches))

    def unrelated_change(shifts) -> float:
        return sum(float(torch.trace(s.T @ c0 @ s)) for s, c0 in zip(shifts, moments))
    free = editor.refine(model, modules, micro_batches, state, Refinement(steps=5, lr=0.5))
    held = editor.refine(model, modules, micro_batches, state, Refinement(steps=5, lr=0.5, preserve=1e6))
    assert unrelated_change(held.param_shifts) < unrelated_change(free.param_shifts)
    # the charge can name its own C0 (lifelong editing binds another matrix to the solve): the same refined shifts
    other = [torch.eye(m.shape[0]) for m in moments]
    editor.bind_key_moments(other)  # unused by this editor's solve (preserve 0), so only the charge could change
    named = editor.refine(model, modules, micro_batches, state, Refinement(steps=5, lr=0.5, preserve=1e6),
                          unrelated_moments=moments)
    for got, want in zip(named.param_shifts, held.param_shifts):
        torch.testing.assert_close(got, want)


def test_the_relative_output_change_is_the_shifts_c0_energy_over_the_weights(tiny_llama):
    """``sum tr(dW^T C0 dW) / sum tr(W^T C0 W)``: 0 without shifts, 1 for shifts equal to the weights, 4 for twice."""
    model, modules, _ = _setup(tiny_llama, 1, 1)
    generator = torch.Generator().manual_seed(0)
    moments = []
    for m in modules:
        a = torch.randn(m.weight.shape[1], m.weight.shape[1], generator=generator)
        moments.append(a @ a.T / a.shape[0])
    weights = [weight_in_out(m).detach().float() for m in modules]
    assert relative_output_change(modules, [torch.zeros_like(w) for w in weights], moments) == 0.0
    assert relative_output_change(modules, weights, moments) == pytest.approx(1.0, rel=1e-5)
    assert relative_output_change(modules, [2 * w for w in weights], moments) == pytest.approx(4.0, rel=1e-5)
    shifts = [torch.randn(w.shape, generator=generator) for w in weights]
    want = (sum(float(torch.trace(s.T @ c @ s)) for s, c in zip(shifts, moments))
            / sum(float(torch.trace(w.T @ c @ w)) for w, c in zip(weights, moments)))
    assert relative_output_change(modules, shifts, moments) == pytest.approx(want, rel=1e-4)
    # a caller measuring many shifts against the same weights passes their energy once
    base = output_energy(weights, moments)
    assert relative_output_change(modules, shifts, moments, base) == pytest.approx(want, rel=1e-4)
    assert relative_output_change(modules, shifts, moments, 2 * base) == pytest.approx(want / 2, rel=1e-4)


def test_the_refinement_budget_holds_the_output_change_on_unrelated_keys(tiny_llama):
    """``budget``: after every step the shifts are scaled back onto the bound, so the refined shifts move unrelated
    keys' outputs by at most the budget (relative to the outputs), and still solve the refined residuals; a budget
    the free refinement stays inside changes nothing."""
    model, modules, micro_batches = _setup(tiny_llama, 4, 2)
    editor = Editor([weight_shape(m) for m in modules], rank=8, lr=50.0)
    moments = [torch.eye(m.weight.shape[1]) + 0.1 * torch.ones(m.weight.shape[1], m.weight.shape[1]) for m in modules]
    editor.bind_key_moments(moments)
    state = editor.param_shifts(editor.capture(model, modules, micro_batches))
    free = editor.refine(model, modules, micro_batches, state, Refinement(steps=5, lr=0.5))
    free_change = relative_output_change(modules, free.param_shifts, moments)
    budget = free_change / 10
    held = editor.refine(model, modules, micro_batches, state, Refinement(steps=5, lr=0.5, budget=budget))
    assert relative_output_change(modules, held.param_shifts, moments) == pytest.approx(budget, rel=1e-3)
    again, _ = editor.update.solve(held.update_keys, held.spread_residuals, editor.log_lambdas(), key_moments=moments)
    for got, want in zip(held.param_shifts, again):
        torch.testing.assert_close(got, want)
    loose = editor.refine(model, modules, micro_batches, state, Refinement(steps=5, lr=0.5, budget=10 * free_change))
    for got, want in zip(loose.param_shifts, free.param_shifts):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="budget must be at least 0"):
        Refinement(steps=1, budget=-1.0)
    with pytest.raises(ValueError, match="preserve instead"):
        editor.refine(model, modules, micro_batches, state, Refinement(steps=1, preserve=1.0, budget=budget),
                      applied_shifts=free.param_shifts)
    editor_without = Editor([weight_shape(m) for m in modules], rank=8, lr=50.0)
    with pytest.raises(ValueError, match="key moments"):
        editor_without.refine(model, modules, micro_batches, state, Refinement(steps=1, budget=budget))


def test_a_refine_hook_sees_each_steps_shifts_and_the_last_until_removed(tiny_llama):
    """``register_refine_hook``: called with steps 0..K, the model unshifted while it runs, the last call with the
    shifts the refinement returns; after ``remove()`` it is not called again."""
    model, modules, micro_batches = _setup(tiny_llama, 4, 2)
    editor = Editor([weight_shape(m) for m in modules], rank=8, lr=50.0)
    state = editor.param_shifts(editor.capture(model, modules, micro_batches))
    weights = [weight_in_out(m).detach().clone() for m in modules]
    seen = []

    def hook(step, shifts):
        for module, weight in zip(modules, weights):  # the hook sees the model as it was before the edit
            torch.testing.assert_close(weight_in_out(module), weight)
        seen.append((step, [s.clone() for s in shifts]))
    handle = editor.register_refine_hook(hook)
    refined = editor.refine(model, modules, micro_batches, state, Refinement(steps=3, lr=0.5))
    assert [step for step, _ in seen] == [0, 1, 2, 3]
    for got, want in zip(seen[-1][1], refined.param_shifts):
        torch.testing.assert_close(got, want)
    assert not all(torch.equal(a, b) for a, b in zip(seen[0][1], seen[-1][1]))  # the steps moved the shifts
    handle.remove()
    editor.refine(model, modules, micro_batches, state, Refinement(steps=2, lr=0.5))
    assert len(seen) == 4


def test_the_anchored_refinement_charges_the_shifts_the_model_already_carries(tiny_llama):
    """``applied_shifts`` A: the charge becomes tr((A + dW)^T C0 (A + dW)), so with a large weight the refined turn
    leaves a smaller total output change on unrelated keys than one charged for its own dW only."""
    model, modules, micro_batches = _setup(tiny_llama, 4, 2)
    editor = Editor([weight_shape(m) for m in modules], rank=8, lr=50.0)
    moments = [torch.eye(m.weight.shape[1]) + 0.1 * torch.ones(m.weight.shape[1], m.weight.shape[1]) for m in modules]
    editor.bind_key_moments(moments)
    state = editor.param_shifts(editor.capture(model, modules, micro_batches))
    generator = torch.Generator().manual_seed(0)
    carried = [0.5 * s.norm() / s.numel() ** 0.5 * torch.randn(s.shape, generator=generator)
               for s in state.param_shifts]  # an earlier turn's shifts, about as large as this turn's per entry

    def total_change(shifts) -> float:
        return sum(float(torch.trace((a + s).T @ c0 @ (a + s))) for a, s, c0 in zip(carried, shifts, moments))
    settings = Refinement(steps=5, lr=0.5, preserve=1e6)
    with applied(modules, carried):
        own = editor.refine(model, modules, micro_batches, state, settings)
        anchored = editor.refine(model, modules, micro_batches, state, settings, applied_shifts=carried)
    assert total_change(anchored.param_shifts) < total_change(own.param_shifts)
    with pytest.raises(ValueError, match="preserve > 0"):
        editor.refine(model, modules, micro_batches, state, Refinement(steps=1), applied_shifts=carried)


def test_shifts_applied_at_masked_positions_change_only_those_positions(tiny_llama):
    from horse_pl.editing.shifts import applied_at

    model, modules, micro_batches = _setup(tiny_llama, 4, 2)
    mb = micro_batches[0]
    shifts = [0.5 * torch.randn(weight_in_out(m).shape) for m in modules]
    with torch.no_grad():
        base = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
        with applied(modules, shifts):
            everywhere = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
        with applied_at(modules, shifts, torch.ones_like(mb["attention_mask"], dtype=torch.bool)):
            torch.testing.assert_close(model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits,
                                       everywhere)
        at = torch.zeros_like(mb["attention_mask"], dtype=torch.bool)
        at[:, 3] = True
        with applied_at(modules, shifts, at):
            masked = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
    torch.testing.assert_close(masked[:, :3], base[:, :3])  # causal: positions before the shifted one are untouched
    assert (masked[:, 3] - base[:, 3]).abs().max() > 1e-3
    assert (masked[:, 4:] - everywhere[:, 4:]).abs().max() > 1e-3  # later positions see only position 3's change


def test_refining_at_the_key_positions_lowers_the_loss_seen_through_the_subject_alone(tiny_llama):
    """``at="keys"``: the refined loss sees the shifts act at the captured key rows only (the subject's last token,
    MEMIT's value optimisation); that loss falls, and the residuals differ from a refinement that sees them act
    everywhere. The returned shifts are still the solve of the refined residuals."""
    from horse_pl.editing.capture import record_mask
    from horse_pl.editing.shifts import applied_at
    from horse_pl.lm.passes import answer_logits

    model, modules, micro_batches = _setup(tiny_llama, 4, 2)
    editor = Editor([weight_shape(m) for m in modules], rank=8, lr=5e4, positions="subject")

    def keyed_loss(shifts) -> float:
        total = 0.0
        with torch.no_grad():
            for mb in micro_batches:
                logits, labels = answer_logits(
                    model, mb, lambda g: applied_at(modules, shifts, record_mask(g, "subject")))
                total += float(torch.nn.functional.cross_entropy(logits, labels))
        return total

    state = editor.param_shifts(editor.capture(model, modules, micro_batches))
    keyed = editor.refine(model, modules, micro_batches, state, Refinement(steps=5, lr=0.5, at="keys"))
    assert keyed_loss(keyed.param_shifts) < keyed_loss(state.param_shifts) - 1e-3
    everywhere = editor.refine(model, modules, micro_batches, state, Refinement(steps=5, lr=0.5))
    for a, b in zip(keyed.spread_residuals, everywhere.spread_residuals):
        assert (a - b).norm() > 1e-3 * b.norm()
    again, _ = editor.update.solve(keyed.update_keys, keyed.spread_residuals, editor.log_lambdas())
    for got, want in zip(keyed.param_shifts, again):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="'at' must be one of"):
        Refinement(steps=1, at="subject")
