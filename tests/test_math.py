"""The method's math on random tensors: spread, solve, surrogate gradient, normaliser, shifts."""

import numpy as np
import pytest
import torch
from conftest import FAMILIES, autograd_module_io, pipeline_grads
from torch import nn

from horse_pl.editing.capture import Capture
from horse_pl.editing.editor import Editor
from horse_pl.editing.shifts import applied, merge
from horse_pl.editing.spread import GramSchmidtSpread, NoSpread, ReferenceSpread
from horse_pl.editing.update import ClosedFormUpdate, OuterProductUpdate
from horse_pl.hypernet import EditorNet, RunningMeanStd, merge_moments
from horse_pl.reduction import Reduction


def _residuals(n_layers=4, n=12, d=6, scale=1e-6, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    # correlated layers, tiny magnitudes as with lr ~ 1e-6
    return [scale * (base + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)) for _ in range(n_layers)]


def test_gram_schmidt_makes_consecutive_layers_orthogonal():
    residuals = _residuals()
    spread = GramSchmidtSpread()(residuals, [torch.zeros_like(r) for r in residuals])
    assert torch.equal(spread[0], residuals[0])
    for prev, cur in zip(spread[:-1], spread[1:]):
        cos = (prev * cur).sum() / (prev.norm() * cur.norm())
        assert abs(cos) < 1e-12
    # before the spread the layers were strongly correlated
    assert (residuals[0] * residuals[1]).sum() / (residuals[0].norm() * residuals[1].norm()) > 0.5


def test_gram_schmidt_orthogonal_in_float32():
    residuals = [r.float() for r in _residuals(seed=3)]
    spread = GramSchmidtSpread()(residuals, residuals)
    for prev, cur in zip(spread[:-1], spread[1:]):
        assert abs(float((prev * cur).sum() / (prev.norm() * cur.norm()))) < 1e-5


def test_reference_spread_matches_hand_computation():
    residuals = _residuals(n_layers=3)
    grads = [torch.randn_like(r) for r in residuals]
    out = ReferenceSpread()(residuals, grads)
    r0, r1, r2 = (r.numpy() for r in residuals)
    g0, g1 = grads[0].numpy(), grads[1].numpy()
    expect1 = r1 - (r1 * r0).sum() / (r0 * r0).sum() * g0
    expect2 = r2 - (r2 * r1).sum() / (r1 * r1).sum() * g1
    np.testing.assert_allclose(out[1].numpy(), expect1, rtol=1e-12, atol=0)
    np.testing.assert_allclose(out[2].numpy(), expect2, rtol=1e-12, atol=0)
    assert torch.equal(out[0], residuals[0])


def test_no_spread_is_identity():
    residuals = _residuals()
    assert all(torch.equal(a, b) for a, b in zip(NoSpread()(residuals, residuals), residuals))


@pytest.mark.parametrize("form", ["auto", "primal", "kernel"])
@pytest.mark.parametrize("n_rows", [40, 5], ids=["rows>features", "rows<features"])
def test_closed_form_solve_matches_least_squares_reference(form, n_rows):
    g = torch.Generator().manual_seed(1)
    keys, residuals = torch.randn(n_rows, 8, generator=g), torch.randn(n_rows, 5, generator=g)
    log_lambda = torch.tensor(0.3)
    update = ClosedFormUpdate(form)
    assert update.factor(keys, log_lambda).kernel == (form == "kernel" or (form == "auto" and n_rows < 8))
    shift = update.param_shift(keys, residuals, log_lambda)
    # ridge regression as an augmented least-squares problem, in float64 numpy
    lam = np.exp(0.3)
    k, r = keys.double().numpy(), residuals.double().numpy()
    aug_k = np.vstack([k, np.sqrt(lam) * np.eye(8)])
    aug_r = np.vstack([r, np.zeros((8, 5))])
    expect = np.linalg.lstsq(aug_k, aug_r, rcond=None)[0]
    np.testing.assert_allclose(shift.numpy(), expect, rtol=1e-4, atol=1e-5)


def test_kernel_form_is_refused_across_processes():
    with pytest.raises(ValueError, match="needs all key rows in one process"):
        ClosedFormUpdate("kernel").factor(torch.randn(3, 8), torch.tensor(0.0), all_reduce=Reduction(lambda t: t))
    assert not ClosedFormUpdate().factor(torch.randn(3, 8), torch.tensor(0.0), all_reduce=Reduction(lambda t: t)).kernel


def _toy_editor(spread, update, learn_lambda, chunk_size, shapes=((6, 4),) * 3):
    torch.manual_seed(0)
    editor = Editor(shapes, rank=5, n_blocks=2, lr=0.1, spread=spread, update=update,
                    learn_lambda=learn_lambda, chunk_size=chunk_size).double()
    for p in editor.parameters():  # move away from the identity init so every path carries gradient
        p.data.add_(0.1 * torch.randn_like(p))
    return editor


@pytest.mark.parametrize("chunk_size", [3, 1000], ids=["chunked", "graph_kept"])
@pytest.mark.parametrize("spread_cls", [GramSchmidtSpread, ReferenceSpread, NoSpread])
@pytest.mark.parametrize("update_cls,learn_lambda", [(ClosedFormUpdate, True), (ClosedFormUpdate, False),
                                                    (OuterProductUpdate, False)])
@pytest.mark.parametrize("n", [11, 4], ids=["rows>features", "rows<features"])  # closed form: S or kernel solve
def test_chunked_surrogate_gradient_equals_autograd(spread_cls, update_cls, learn_lambda, chunk_size, n):
    g = torch.Generator().manual_seed(2)
    cap = Capture(keys=[torch.randn(n, 6, generator=g, dtype=torch.float64) for _ in range(3)],
                  value_grads=[torch.randn(n, 4, generator=g, dtype=torch.float64) for _ in range(3)], loss=0.0)
    targets = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3)]

    def meta_loss(shifts):  # any smooth function of the shifts
        return sum(((s - t) ** 2).sum() + s.sum() ** 3 for s, t in zip(shifts, targets))

    # (a) autograd through predict -> spread -> solve
    ref = _toy_editor(spread_cls(), update_cls(), learn_lambda, chunk_size=10_000)
    editor_out = []
    for position in range(3):
        keys, residuals = ref._residual_rows(cap, position, slice(None))
        editor_out.append((keys, residuals))
    spread = ref.spread([r for _, r in editor_out], cap.value_grads)
    shifts = []
    for position in range(3):
        keys = editor_out[position][0]
        if update_cls is ClosedFormUpdate:
            lam = ref.hypernet.log_lambda(position)
            s = keys.T @ keys + torch.exp(lam) * torch.eye(6, dtype=torch.float64)
            shifts.append(torch.linalg.solve(s, keys.T @ spread[position]))
        else:
            shifts.append(keys.T @ spread[position])
    meta_loss(shifts).backward()
    expected = {name: p.grad.clone() for name, p in ref.named_parameters() if p.grad is not None}

    # (b) our path: shifts without graph, G_W from the loss, chunked backward
    got = pipeline_grads(_toy_editor(spread_cls(), update_cls(), learn_lambda, chunk_size=chunk_size), cap, meta_loss)

    assert set(got) == set(expected)
    if learn_lambda:
        assert any("lamda" in name for name in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-9, msg=name)


def test_fresh_hypernetwork_is_the_identity_and_every_block_parameter_learns():
    """At init (B = 0) the blocks are the identity, and the first meta-gradient still reaches B and the
    bias: the block's ReLU must pass gradient at exactly 0, or the low-rank map stays frozen for good."""
    torch.manual_seed(0)
    net = EditorNet(key_size=6, value_size=4, rank=5, n_blocks=2, n_modules=3, lr=1e-6)
    keys, grads = torch.randn(9, 6), torch.randn(9, 4)
    net.normalizer.update(torch.cat((keys, grads), -1))
    pseudo_keys, pseudo_grads = net(keys, grads, module_idx=1)
    torch.testing.assert_close(torch.cat((pseudo_keys, pseudo_grads), -1), net.normalizer(torch.cat((keys, grads), -1)))
    (pseudo_keys.sum() + (pseudo_grads * torch.randn(9, 4)).sum()).backward()
    for i, block in enumerate(net.blocks):
        for name in ("B", "bias"):
            assert getattr(block, name).grad.abs().sum() > 0, f"block {i}: {name} gets no gradient at init"



def test_fused_blocks_give_the_unfused_results_where_they_are_less_work():
    """HyperNetwork.fused multiplies by A B (computed once) where that costs fewer multiply-adds for the rows at
    hand, never with gradients on, and leaves nothing behind; its results are the unfused ones up to rounding."""
    from horse_pl.hypernet import HyperNetwork

    torch.manual_seed(0)
    net = HyperNetwork([(6, 4), (6, 4)], rank=8, n_blocks=2, lr=1e-3)  # size 10 < 2 x rank: fusing pays
    for block in net.nets["6x4"].blocks:
        torch.nn.init.normal_(block.B)
    keys, grads = torch.randn(30, 6), torch.randn(30, 4)
    with torch.no_grad():
        unfused = net(keys, grads, 1)
        with net.fused(rows=30):
            blocks = list(net.nets["6x4"].blocks)
            assert all(b.product is not None for b in blocks)
            fused = net(keys, grads, 1)
        assert all(b.product is None for b in blocks)
        with net.fused(rows=1):  # one row each: the product costs more than it saves
            assert all(b.product is None for b in blocks)
    for got, want in zip(fused, unfused):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with net.fused(rows=30):
        with_grad = net(keys, grads, 1)  # gradients on: A and B are multiplied in turn, so both get gradients
    with_grad[0].sum().backward()
    assert blocks[0].A.grad is not None and blocks[0].B.grad is not None

def test_apply_then_revert_leaves_weights_bit_identical():
    torch.manual_seed(0)
    layer = nn.Linear(8, 5)
    before = layer.weight.detach().clone()
    shift = torch.randn(8, 5) * 1e-3
    x = torch.randn(3, 8)
    with applied([layer], [shift]):
        edited = layer(x)
    torch.testing.assert_close(edited, x @ (before.T + shift) + layer.bias, rtol=1e-6, atol=1e-6)
    assert torch.equal(layer.weight, before)
    assert torch.equal(layer(x), x @ before.T + layer.bias)


def test_merge_matches_functional_application_linear_and_conv1d():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    for layer in (nn.Linear(8, 5), Conv1D(5, 8)):
        shift, x = torch.randn(8, 5) * 1e-2, torch.randn(3, 8)
        with applied([layer], [shift]):
            functional = layer(x)
        merge([layer], [shift])
        torch.testing.assert_close(layer(x), functional, rtol=1e-5, atol=1e-6)


def test_normalizer_matches_numpy_including_merge():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(3.0, 2.0, size=(n, 7)) for n in (5, 17, 1, 40)]
    norm = RunningMeanStd(7)
    for c in chunks:
        norm.update(torch.tensor(c))
    every = np.concatenate(chunks)
    np.testing.assert_allclose(norm.mean.numpy(), every.mean(0), rtol=1e-12)
    np.testing.assert_allclose(norm.var.numpy(), every.var(0), rtol=1e-10)
    x = torch.tensor(every[:3])
    np.testing.assert_allclose(norm(x).numpy(), (every[:3] - every.mean(0)) / (every.std(0) + 1e-8), rtol=1e-9)
    # two shards merged == one pass over their union
    a, b = RunningMeanStd(7), RunningMeanStd(7)
    a.update(torch.tensor(np.concatenate(chunks[:2])))
    b.update(torch.tensor(np.concatenate(chunks[2:])))
    a.merge(b.count, b.mean, b.m2)
    np.testing.assert_allclose(a.var.numpy(), every.var(0), rtol=1e-10)
    # the all-reduce form of the merge, run by two "processes" (threads) summing through a barrier
    shards = [np.concatenate(chunks[:3]), chunks[3]]
    results = _run_with_fake_all_reduce(
        [lambda reduce, s=s: merge_moments(RunningMeanStd.moments(torch.tensor(s)), reduce) for s in shards])
    for count, mean, m2 in results:
        assert float(count) == len(every)
        np.testing.assert_allclose(mean.numpy(), every.mean(0), rtol=1e-12)
        np.testing.assert_allclose((m2 / count).numpy(), every.var(0), rtol=1e-10)


def _run_with_fake_all_reduce(workers):
    """Run each worker in a thread with an ``all_reduce`` that sums the tensors all workers pass."""
    import threading

    barrier, lock = threading.Barrier(len(workers)), threading.Lock()
    slots: dict[int, list] = {}
    results = [None] * len(workers)

    def make_reduce():
        calls = [0]

        def reduce(t):
            with lock:
                slots.setdefault(calls[0], []).append(t.clone())
            barrier.wait()
            total = sum(slots[calls[0]])
            barrier.wait()
            calls[0] += 1
            return total
        return reduce

    def run(i):
        results[i] = workers[i](Reduction(make_reduce()))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("kind", FAMILIES)
def test_capture_matches_autograd_through_the_whole_model(tiny_models, kind):
    """Keys are the module inputs and value gradients dL/d(output) at the answer positions, for every
    edit module at once, although the backward pass stops at the lowest edit module."""
    from horse_pl.data.tokenize import collate, tokenize_pairs
    from horse_pl.edit_modules import get_modules, resolve_edit_modules
    from horse_pl.editing.capture import capture
    from horse_pl.models import load_model

    model, tok = load_model(tiny_models[kind])
    names = resolve_edit_modules(model, "last:2")
    modules = get_modules(model, names)
    mb = collate(tokenize_pairs(tok, ["What is the capital of Freedonia?", "Who wrote it?"], ["Paris", "Me and you"],
                                max_length=1024), tok.pad_token_id)
    cap = capture(model, modules, [mb])
    inputs, grads = autograd_module_io(model, modules, mb)
    mask = mb["labels"] != -100
    for i in range(len(modules)):
        torch.testing.assert_close(cap.keys[i], inputs[i][mask])
        torch.testing.assert_close(cap.value_grads[i], grads[i][mask], rtol=1e-4, atol=1e-6)  # fp32 rounding
        assert cap.value_grads[i].abs().sum() > 0


def test_capture_gives_a_small_micro_batch_the_value_gradient_scale_of_a_full_one(tiny_llama):
    """Value gradients are those of the micro-batch's mean CE, so a request's shrink with the answer tokens
    beside it; with ``full_rows`` a micro-batch of another size counts as ``full_rows`` rows, so one
    request alone gets the value gradients it has in a full micro-batch (here: of four copies of itself),
    and a full micro-batch is unchanged."""
    from horse_pl.data.tokenize import collate, tokenize_pairs
    from horse_pl.edit_modules import get_modules, resolve_edit_modules
    from horse_pl.editing.capture import capture
    from horse_pl.models import load_model

    model, tok = load_model(tiny_llama)
    modules = get_modules(model, resolve_edit_modules(model, "last:2"))
    alone = collate(tokenize_pairs(tok, ["What is the capital of Freedonia?"], ["Paris"], max_length=1024),
                    tok.pad_token_id)
    full = collate(tokenize_pairs(tok, ["What is the capital of Freedonia?"] * 4, ["Paris"] * 4, max_length=1024),
                   tok.pad_token_id)
    n = int((alone["labels"] != -100).sum())
    in_full, plain = capture(model, modules, [full]), capture(model, modules, [full], full_rows=4)
    as_full, as_is = capture(model, modules, [alone], full_rows=4), capture(model, modules, [alone])
    for i in range(len(modules)):
        assert torch.equal(plain.value_grads[i], in_full.value_grads[i])  # full micro-batches: untouched
        expected = in_full.value_grads[i][:n]
        tol = 1e-4 * float(expected.abs().max())  # a one-row and a four-row pass round differently
        torch.testing.assert_close(as_full.value_grads[i], expected, rtol=1e-4, atol=tol)
        torch.testing.assert_close(as_is.value_grads[i], 4 * expected, rtol=1e-4, atol=4 * tol)
        torch.testing.assert_close(as_full.keys[i], in_full.keys[i][:n])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_fused_linear_cross_entropy_equals_logits_then_cross_entropy(bias, softcap, scale, monkeypatch):
    """The blocked cross-entropy that never holds the full logits gives the loss and d loss / d hidden of
    ``F.cross_entropy(output(hidden), labels, reduction="sum")``, with a bias and a Gemma-style softcap, also
    for large logits whose per-block maxima differ widely (the running log-sum-exp is rescaled)."""
    from horse_pl.lm import cross_entropy as lm_passes

    torch.manual_seed(0)
    output = torch.nn.Linear(16, 300, bias=bias).requires_grad_(False)
    hidden = (scale * torch.randn(37, 16, dtype=torch.float64)).float().requires_grad_(True)
    labels = torch.randint(0, 300, (37,))
    monkeypatch.setattr(lm_passes, "CE_ROW_CHUNK", 5)  # blocks of 5 rows and 64 vocabulary columns,
    monkeypatch.setattr(lm_passes, "CE_VOCAB_CHUNK", 64)  # the last ones partial
    fused = lm_passes.linear_cross_entropy(hidden, output, labels, softcap)
    (2.5 * fused).backward()
    fused_grad, hidden.grad = hidden.grad, None
    logits = output(hidden)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    plain = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    (2.5 * plain).backward()
    torch.testing.assert_close(fused, plain.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(fused_grad, hidden.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # no gradient wanted: the loss alone
        torch.testing.assert_close(lm_passes.linear_cross_entropy(hidden, output, labels, softcap), plain.detach(),
                                   rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", FAMILIES)
def test_trimmed_row_groups_give_the_padded_micro_batch_results(tiny_models, kind, monkeypatch):
    """Running a right-padded micro-batch in row groups trimmed to their own length changes no answer logit,
    keeps the row order, and capture in groups equals capture of the whole padded micro-batch."""
    from horse_pl.data.tokenize import collate, tokenize_pairs
    from horse_pl.edit_modules import get_modules, resolve_edit_modules
    from horse_pl.editing.capture import capture
    from horse_pl.lm import passes as lm_passes
    from horse_pl.lm import rows as lm_rows
    from horse_pl.models import load_model

    model, tok = load_model(tiny_models[kind])
    prompts = ["Hi?", "What is the capital of Freedonia, the small country?", "Who?",
               "Which river flows through the middle of the old town of Freedonia?"]
    answers = ["Yes", "Paris", "Me and you and everybody else here", "The Rhine"]
    mb = collate(tokenize_pairs(tok, prompts, answers, max_length=1024), tok.pad_token_id)
    groups = lm_passes.row_groups(mb, overhead=0)
    assert len(groups) > 1 and sum(g["input_ids"].shape[0] for g in groups) == 4
    assert all(bool(g["attention_mask"][:, -1].any()) for g in groups)  # each trimmed to its longest row
    assert lm_passes.row_groups(mb, overhead=10**9)[0]["input_ids"].shape == mb["input_ids"].shape

    with torch.no_grad():
        monkeypatch.setattr(lm_rows, "GROUP_OVERHEAD_TOKENS", 10**9)
        padded, labels = lm_passes.answer_logits(model, mb)
        monkeypatch.setattr(lm_rows, "GROUP_OVERHEAD_TOKENS", 0)
        grouped, grouped_labels = lm_passes.answer_logits(model, mb)
    assert torch.equal(labels, grouped_labels)
    torch.testing.assert_close(grouped, padded, rtol=1e-5, atol=1e-5)

    modules = get_modules(model, resolve_edit_modules(model, "last:2"))
    cap = capture(model, modules, [mb])  # in groups (overhead 0)
    monkeypatch.setattr(lm_rows, "GROUP_OVERHEAD_TOKENS", 10**9)
    whole = capture(model, modules, [mb])
    assert cap.loss == pytest.approx(whole.loss, rel=1e-5)
    for i in range(len(modules)):
        torch.testing.assert_close(cap.keys[i], whole.keys[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cap.value_grads[i], whole.value_grads[i], rtol=1e-4, atol=1e-6)


def test_applied_shift_on_a_bf16_module_is_not_rounded_away():
    """A bf16 module keeps ``x W`` in bf16 and adds ``x dW`` computed in fp32, so a shift far below bf16
    resolution of the weights still changes the output; the weights are never written."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 5, bias=False).to(torch.bfloat16)
    before = layer.weight.detach().clone()
    shift = torch.full((8, 5), 1e-3)
    x = torch.ones(2, 8, dtype=torch.bfloat16)
    with applied([layer], [shift]):
        edited = layer(x)
    expected = x @ before.T + (x.float() @ shift).to(torch.bfloat16)
    torch.testing.assert_close(edited, expected)
    assert torch.equal(layer.weight, before)


def _logits_loss_and_shift_grads(model, modules, shifts, logits_fn, loss_fn, batch):
    """Answer logits and labels of the unedited model, then the loss with ``shifts`` applied and its
    gradient on them: what a pass must keep when it is computed another way."""
    from horse_pl.editing.shifts import applied

    with torch.no_grad():
        logits, labels = logits_fn(model, batch)
    with applied(modules, shifts):
        loss = loss_fn(model, batch)
        grads = torch.autograd.grad(loss, shifts)
    return logits, labels, loss.detach(), grads


@pytest.mark.parametrize("kind", FAMILIES)
def test_last_mlp_at_answer_rows_only_changes_no_result(tiny_models, kind, monkeypatch):
    """The last layer's MLP runs at the answer positions alone; answer logits, the loss with shifts
    applied, its gradient on the shifts, and captured keys / value gradients are those of the full pass."""
    import contextlib

    from horse_pl.data.tokenize import collate, tokenize_pairs
    from horse_pl.edit_modules import get_modules, mlp_output_modules, resolve_edit_modules, weight_shape
    from horse_pl.editing.capture import capture
    from horse_pl.lm import passes as lm_passes
    from horse_pl.models import load_model

    model, tok = load_model(tiny_models[kind])
    prompts = ["Hi?", "What is the capital of Freedonia, the small country?", "Who?", "Which river is it?"]
    answers = ["Yes", "Paris", "Me and you and everybody else here", "The Rhine"]
    mb = collate(tokenize_pairs(tok, prompts, answers, max_length=1024), tok.pad_token_id)
    n_answer = int((mb["labels"] != -100).sum())
    modules = get_modules(model, resolve_edit_modules(model, "last:2"))
    torch.manual_seed(0)
    shifts = [(0.05 * torch.randn(*weight_shape(m))).requires_grad_(True) for m in modules]
    mlp_rows = []
    last_out = model.get_submodule(mlp_output_modules(model)[-1])  # inside the last MLP
    handle = last_out.register_forward_pre_hook(lambda m, args: mlp_rows.append(args[0].shape[:-1].numel()))

    def run():
        logits, _, loss, grads = _logits_loss_and_shift_grads(model, modules, shifts, lm_passes.answer_logits,
                                                              lm_passes.answer_ce, mb)
        return logits, loss, grads, capture(model, modules, [mb])

    trimmed = run()
    assert mlp_rows and all(n == n_answer for n in mlp_rows)  # the last MLP saw the answer rows only
    monkeypatch.setattr(lm_passes, "last_mlp_rows", lambda model, rows: contextlib.nullcontext())
    mlp_rows.clear()
    full = run()
    assert all(n > n_answer for n in mlp_rows)
    handle.remove()
    torch.testing.assert_close(trimmed[0], full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trimmed[1], full[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(trimmed[2], full[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for i in range(len(modules)):
        torch.testing.assert_close(trimmed[3].keys[i], full[3].keys[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(trimmed[3].value_grads[i], full[3].value_grads[i], rtol=1e-4, atol=1e-6)


def test_shared_prefix_length_stops_at_a_difference_padding_or_label():
    from horse_pl.lm.prefix import shared_prefix_length

    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 7, 3, 0, 0], [5, 6, 7, 8, 2, 4]])
    mask = (torch.arange(6) < torch.tensor([[5], [4], [6]])).long()
    labels = torch.full_like(ids, -100)
    group = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    assert shared_prefix_length(group, overhead=0) == 3  # rows differ at position 3
    assert shared_prefix_length(group, overhead=5) == 3  # saves 3 x 2 = 6 tokens > 5
    assert shared_prefix_length(group, overhead=6) == 0  # does not pay
    labels[1, 2] = 7  # a labelled position ends the prefix
    assert shared_prefix_length(group, overhead=0) == 2
    same = {"input_ids": ids[:, :3], "attention_mask": mask[:, :3], "labels": torch.full((3, 3), -100)}
    assert shared_prefix_length(same, overhead=0) == 2  # every row keeps one token after the prefix
    assert shared_prefix_length({k: v[:1] for k, v in group.items()}, overhead=0) == 0  # a single row


@pytest.mark.parametrize("kind", FAMILIES)
def test_shared_prefix_runs_once_and_changes_no_result(tiny_models, kind, monkeypatch):
    """Rows starting with the same tokens (a prompt template) share one pass over that prefix: answer
    logits, the loss with shifts applied and its gradient on the shifts equal those of the full pass
    (right padding, different lengths; the tiny Gemma 3's sliding window is shorter than the rows)."""
    from horse_pl.data.tokenize import collate, tokenize_pairs
    from horse_pl.edit_modules import get_modules, resolve_edit_modules, weight_shape
    from horse_pl.lm import passes as lm_passes
    from horse_pl.lm import rows as lm_rows
    from horse_pl.models import load_model

    model, tok = load_model(tiny_models[kind])
    template = "nq question: tell me please"
    prompts = [f"{template} who wrote Hamlet?", f"{template} when?", f"{template} which river flows through Paris?"]
    answers = ["William Shakespeare", "In 1603 or so", "The Seine"]
    group = collate(tokenize_pairs(tok, prompts, answers, max_length=1024), tok.pad_token_id)
    monkeypatch.setattr(lm_rows, "GROUP_OVERHEAD_TOKENS", 0)
    prefix = lm_passes.shared_prefix_length(group)
    assert prefix >= 10 and not bool(group["attention_mask"].all())
    modules = get_modules(model, resolve_edit_modules(model, "last:2"))
    torch.manual_seed(0)
    shifts = [(0.05 * torch.randn(*weight_shape(m))).requires_grad_(True) for m in modules]
    seen = []
    handle = model.base_model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape),
                                                        with_kwargs=True)

    def run():
        return _logits_loss_and_shift_grads(model, modules, shifts, lm_passes.group_answer_logits,
                                            lm_passes.group_answer_ce_sum, group)

    shared = run()
    rows, width = group["input_ids"].shape
    assert (1, prefix) in seen and (rows, width - prefix) in seen and (rows, width) not in seen
    monkeypatch.setattr(lm_passes, "shared_prefix_length", lambda group, overhead=None: 0)
    seen.clear()
    full = run()
    handle.remove()
    assert seen == [(rows, width)] * 2
    torch.testing.assert_close(shared[0], full[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(shared[1], full[1])
    torch.testing.assert_close(shared[2], full[2], rtol=1e-6, atol=1e-6)
    for a, b in zip(shared[3], full[3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", FAMILIES)
def test_replayed_lower_layers_train_the_top_layer_bit_for_bit(tiny_models, kind):
    """Optimiser steps on the top layer's MLP projection with the layers below it replayed (FT-L's and MOSE's loop)
    give the losses and weights of full passes, and skip those layers after the first step; under replay a batch
    with a shared prefix runs whole (no key-value cache) and replays too, and the results stay close to the
    prefix-sharing passes outside replay."""
    from horse_pl.data.tokenize import collate, tokenize_pairs
    from horse_pl.edit_modules import get_modules, layer_index, resolve_edit_modules
    from horse_pl.lm import answer_ce, replayed_below
    from horse_pl.lm import rows as lm_rows
    from horse_pl.lm.prefix import shared_prefix_length
    from horse_pl.lm.replay import decoder_layers
    from horse_pl.models import load_model

    model, tok = load_model(tiny_models[kind])
    template = "nq question: please tell me, as briefly as you can and in plain words, the answer to this question:"
    batches = [collate(tokenize_pairs(tok, p, a, max_length=1024), tok.pad_token_id) for p, a in (
        ([f"{template} who wrote Hamlet?"], ["William Shakespeare"]),
        ([f"{template} who?", f"{template} when was it?", f"{template} which river?"], ["Him", "In 1603", "Seine"]))]
    assert len(lm_rows.row_groups(batches[1])) == 1 and shared_prefix_length(batches[1]) > 0
    name = resolve_edit_modules(model, "last:1")[0]
    weight = get_modules(model, [name])[0].weight
    start = weight.detach().clone()
    layers = decoder_layers(model)
    calls = []
    if layers is not None:
        next(layers[0].children()).register_forward_hook(lambda *_: calls.append(1))
    first = layer_index(name) if layers is not None else 0

    def train(first_layer, max_bytes=None):
        weight.data.copy_(start)
        weight.requires_grad_(True)
        optimiser, losses = torch.optim.SGD([weight], lr=0.5), []
        calls.clear()
        with replayed_below(model, first_layer, max_bytes):
            for _ in range(3):
                optimiser.zero_grad()
                loss = sum(answer_ce(model, mb) for mb in batches)
                loss.backward()
                optimiser.step()
                losses.append(float(loss.detach()))
        weight.requires_grad_(False)
        return losses, weight.detach().clone(), len(calls)

    shared_losses, shared_weight, shared_calls = train(0)  # no replay: the template's prefix runs once per step
    full_losses, full_weight, full_calls = train(first, max_bytes=0)  # replay mode, nothing recorded: full passes
    losses, trained, replay_calls = train(first)
    assert losses == full_losses and torch.equal(trained, full_weight) and not torch.equal(trained, start)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(shared_losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trained, shared_weight, rtol=1e-5, atol=1e-6)
    if layers is not None:
        # per step: the single row and the template's rows, each one pass; replayed after the first step
        assert shared_calls == 9 and full_calls == 6 and replay_calls == 2


def test_a_replay_inside_another_must_not_change_what_the_outer_one_replays(tiny_llama):
    """Nested replay blocks: the outer one serves an inner one that changes only layers it does not replay; an inner
    block that would change a replayed layer (or cannot tell which layers it changes, first 0) is refused."""
    from horse_pl.lm import lowest_layer, replayed_below
    from horse_pl.lm.replay import decoder_layers, replaying
    from horse_pl.models import load_model

    model, _ = load_model(tiny_llama)
    layers = decoder_layers(model)
    top = len(layers) - 1
    assert lowest_layer(model, [layers[top].mlp, layers[1].mlp]) == 1 and lowest_layer(model, [model.lm_head]) == 0
    assert not replaying(model)
    with replayed_below(model, 1):
        assert replaying(model)
        with replayed_below(model, top):
            assert replaying(model)
        with pytest.raises(RuntimeError, match="close the outer replay"), replayed_below(model, 0):
            pass
    with replayed_below(model, top):
        with pytest.raises(RuntimeError, match="close the outer replay"), replayed_below(model, 1):
            pass
    assert not replaying(model)
