"""The preservation term of the closed-form solve (mu C0, MEMIT's key statistics) and the ridge that grows
with the rows: the solve against an augmented least-squares reference, gradients against autograd, the key
moments against a plain computation, and their cache."""

import numpy as np
import pytest
import torch
from conftest import cubic_meta_loss, perturbed_editor, pipeline_grads

from horse_pl.editing.capture import Capture
from horse_pl.editing.key_stats import cached_key_moments, key_second_moments, preservation_texts
from horse_pl.editing.update import ClosedFormUpdate
from horse_pl.models import load_model


def _moment(d, seed):
    g = torch.Generator().manual_seed(seed)
    k0 = torch.randn(50, d, generator=g, dtype=torch.float64)
    return k0, k0.T @ k0 / 50


@pytest.mark.parametrize("n_rows", [40, 5], ids=["rows>features", "rows<features"])
def test_preserving_solve_matches_least_squares_with_unrelated_keys_kept(n_rows):
    g = torch.Generator().manual_seed(1)
    keys, residuals = torch.randn(n_rows, 8, generator=g), torch.randn(n_rows, 5, generator=g)
    k0, c0 = _moment(8, 2)
    mu, per_row = 30.0, 0.01
    update = ClosedFormUpdate(preserve=mu, ridge_per_row=per_row)
    factor = update.factor(keys, torch.tensor(0.3), key_moments=c0.float())
    assert not factor.kernel  # the d x d form holds C0
    shift = update.param_shift(keys, residuals, torch.tensor(0.3), factor=factor)
    # min ||K dW - R||^2 + (e^lambda + c N) ||dW||^2 + mu/50 ||K0 dW||^2: the unrelated keys' outputs stay put
    lam = np.exp(0.3) + per_row * n_rows
    aug_k = np.vstack([keys.double().numpy(), np.sqrt(lam) * np.eye(8), np.sqrt(mu / 50) * k0.numpy()])
    aug_r = np.vstack([residuals.double().numpy(), np.zeros((8 + 50, 5))])
    expect = np.linalg.lstsq(aug_k, aug_r, rcond=None)[0]
    np.testing.assert_allclose(shift.numpy(), expect, rtol=1e-4, atol=1e-5)
    # and the preserved keys move less than without the term
    plain = ClosedFormUpdate().param_shift(keys, residuals, torch.tensor(0.3))
    assert (k0.float() @ shift).norm() < 0.7 * (k0.float() @ plain).norm()


def test_preservation_needs_key_moments_and_the_primal_form():
    with pytest.raises(ValueError, match="key moments"):
        ClosedFormUpdate(preserve=1.0).factor(torch.randn(3, 8), torch.tensor(0.0))
    with pytest.raises(ValueError, match="kernel"):
        ClosedFormUpdate("kernel", preserve=1.0)
    with pytest.raises(ValueError, match="at least 0"):
        ClosedFormUpdate(ridge_per_row=-1.0)


@pytest.mark.parametrize("learn_lambda", [True, False])
def test_preserving_solve_gradient_equals_autograd(learn_lambda):
    g = torch.Generator().manual_seed(2)
    n, shapes = 9, ((6, 4),) * 3
    cap = Capture(keys=[torch.randn(n, 6, generator=g, dtype=torch.float64) for _ in range(3)],
                  value_grads=[torch.randn(n, 4, generator=g, dtype=torch.float64) for _ in range(3)], loss=0.0)
    moments = [_moment(6, 10 + i)[1] for i in range(3)]
    targets = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    mu, per_row = 5.0, 0.2

    def make():
        return perturbed_editor(shapes, ClosedFormUpdate(preserve=mu, ridge_per_row=per_row), moments, learn_lambda)

    meta_loss = cubic_meta_loss(targets)

    ref = make()
    rows = [ref._residual_rows(cap, p, slice(None)) for p in range(3)]
    spread = ref.spread([r for _, r in rows], cap.value_grads)
    shifts = []
    for p, (keys, _) in enumerate(rows):
        ridge = torch.exp(ref.hypernet.log_lambda(p)) + per_row * n
        s = keys.T @ keys + ridge * torch.eye(6, dtype=torch.float64) + mu * moments[p]
        shifts.append(torch.linalg.solve(s, keys.T @ spread[p]))
    meta_loss(shifts).backward()
    expected = {name: p.grad.clone() for name, p in ref.named_parameters() if p.grad is not None}

    ours = make()
    got = pipeline_grads(ours, cap, meta_loss)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-9, msg=name)
    assert "key_moment_0" not in ours.state_dict()  # from the base model: never saved with the editor


def test_key_moments_equal_a_plain_computation_and_are_cached(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("HORSE_PL_CACHE", str(tmp_path))
    model, tokenizer = load_model(tiny_llama)
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    modules = [model.get_submodule(n) for n in names]
    texts = preservation_texts(n=6)
    assert len(texts) == 6 and any(t.startswith("Question:") for t in texts)
    moments = key_second_moments(model, tokenizer, modules, texts, batch_size=4)
    # plain: every token's input to each module from full forward passes, one text at a time
    seen = [[] for _ in modules]
    handles = [m.register_forward_hook(lambda mod, inp, out, i=i: seen[i].append(inp[0][0]))
               for i, m in enumerate(modules)]
    with torch.no_grad():
        for text in texts:
            model(**tokenizer(text, return_tensors="pt", truncation=True, max_length=128))
    for h in handles:
        h.remove()
    for moment, rows in zip(moments, seen):
        keys = torch.cat(rows).double()
        torch.testing.assert_close(moment.double(), keys.T @ keys / keys.shape[0], rtol=1e-4, atol=1e-6)
    first = cached_key_moments(model, tokenizer, names, n_texts=6)
    assert len(list((tmp_path / "key_stats").glob("*.safetensors"))) == 1
    again = cached_key_moments(model, tokenizer, names, n_texts=6)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # the same base model in bf16 (same fingerprint) gets its own moments, not the fp32 model's
    in_bf16 = cached_key_moments(model.to(torch.bfloat16), tokenizer, names, n_texts=6)
    assert len(list((tmp_path / "key_stats").glob("*.safetensors"))) == 2
    assert not all(torch.equal(a, b) for a, b in zip(first, in_bf16))


def test_preserving_editor_trains_exports_and_edits(tiny_llama, tmp_path, monkeypatch):
    from conftest import train_args

    from horse_pl.api import KnowledgeEditor
    from horse_pl.cli import cli
    from horse_pl.data import load_requests
    from horse_pl.export import export_checkpoint, load_editor

    monkeypatch.setenv("HORSE_PL_CACHE", str(tmp_path / "cache"))
    update = '{"class_path": "horse_pl.editing.update.ClosedFormUpdate", "init_args": {"preserve": 100.0}}'
    ckpt = ["--trainer.callbacks+", "lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.dirpath",
            str(tmp_path / "ckpt"), "--trainer.callbacks.save_last", "true"]
    run = cli(["fit"] + train_args(tiny_llama, tmp_path / "run", steps=2, **{"model.update": update}) + ckpt)
    assert run.model.editor.key_moments is not None  # bound from the base model when the module was built
    assert list((tmp_path / "cache" / "key_stats").glob("*.safetensors"))
    export_checkpoint(tmp_path / "ckpt" / "last.ckpt", tmp_path / "editor")
    editor, config = load_editor(tmp_path / "editor")
    assert config.update_args["preserve"] == 100.0 and editor.update.preserve == 100.0
    requests, _ = load_requests("../shared/data/zsre/zsre_eval_1k.json.gz", "zsre", limit=6)
    shifts = {}
    for mu in (0.0, 100.0, 1e9):
        ke = KnowledgeEditor.from_pretrained(tmp_path / "editor", update_args={"preserve": mu})
        shifts[mu], _ = ke.edit(requests, merge_shifts=False)
    norm = {mu: sum(float(s.norm()) for s in shift) for mu, shift in shifts.items()}
    assert norm[1e9] < norm[100.0] < norm[0.0]  # the more unrelated text is kept, the smaller the update
