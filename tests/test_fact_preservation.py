"""The second preservation term of the closed-form solve, ``mu_f F``: ``F`` the second moment of the edit modules'
keys at the answer tokens of known facts (the neighbourhood an edit must leave alone). Its moments against the
capture pass's own keys, its place in both solves, its gradient, the errors, and an editor that remembers its facts."""

import pytest
import torch
from conftest import cubic_meta_loss, perturbed_editor, pipeline_grads

from horse_pl.data.batch import edit_batch
from horse_pl.data.records import load_requests
from horse_pl.editing.capture import Capture, capture
from horse_pl.editing.key_stats import FACT_VIEWS, bind_preservation, cached_fact_moments, fact_key_moments
from horse_pl.editing.update import ClosedFormUpdate, JointClosedFormUpdate
from horse_pl.models import load_model

ZSRE_EVAL = "../shared/data/zsre/zsre_eval_1k.json.gz"
CF_TRAIN = "../shared/data/counterfact/counterfact_train_10k.json.gz"


def _moment(d, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(30, d, generator=g, dtype=torch.float64)
    return k.T @ k / 30


def test_fact_moments_are_the_keys_the_capture_pass_sees_at_true_answers(tiny_llama):
    model, tokenizer = load_model(tiny_llama)
    modules = [model.get_submodule(f"model.layers.{i}.mlp.down_proj") for i in (0, 1)]
    requests, _ = load_requests(CF_TRAIN, "counterfact", limit=5)
    moments = fact_key_moments(model, tokenizer, modules, requests, batch_size=2)
    # reference: the capture pass (keys at the answer positions) on the prompt + true answer and the unrelated
    # prompt + its answer of every request
    batch = edit_batch(tokenizer, requests, FACT_VIEWS, 3, 256)
    keys = [[] for _ in modules]
    for view in FACT_VIEWS:
        cap = capture(model, modules, batch[view].micro_batches)
        for i, k in enumerate(cap.keys):
            keys[i].append(k.double())
    n_answers = sum(int((mb["labels"] != -100).sum()) for view in FACT_VIEWS for mb in batch[view])
    n_tokens = sum(int(mb["attention_mask"].sum()) for view in FACT_VIEWS for mb in batch[view])
    assert 2 * len(requests) <= n_answers < n_tokens / 2  # answer tokens only, of both views
    for moment, parts in zip(moments, keys):
        k = torch.cat(parts)
        assert k.shape[0] == n_answers
        torch.testing.assert_close(moment.double(), k.T @ k / k.shape[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n_rows", [40, 5], ids=["rows>features", "rows<features"])
def test_fact_term_adds_to_the_solve_as_its_own_weighted_moment(n_rows):
    g = torch.Generator().manual_seed(1)
    keys, residuals = torch.randn(n_rows, 8, generator=g), torch.randn(n_rows, 5, generator=g)
    c0, facts = _moment(8, 2).float(), _moment(8, 3).float()
    mu, mu_f = 30.0, 70.0
    lam = torch.tensor(0.3)
    both = ClosedFormUpdate(preserve=mu, preserve_facts=mu_f)
    factor = both.factor(keys, lam, key_moments=c0, fact_moments=facts)
    assert not factor.kernel
    shift = both.param_shift(keys, residuals, lam, factor=factor)
    one = ClosedFormUpdate(preserve=1.0)
    expect = one.param_shift(keys, residuals, lam, factor=one.factor(keys, lam, key_moments=mu * c0 + mu_f * facts))
    torch.testing.assert_close(shift, expect, rtol=1e-5, atol=1e-6)
    # facts alone (no text term) move the facts' keys' outputs less than no term at all
    only = ClosedFormUpdate(preserve_facts=1e3)
    kept = only.param_shift(keys, residuals, lam, factor=only.factor(keys, lam, fact_moments=facts))
    plain = ClosedFormUpdate().param_shift(keys, residuals, lam)
    assert float(torch.einsum("ij,ik,kj->", kept, facts, kept)) < 0.5 * float(
        torch.einsum("ij,ik,kj->", plain, facts, plain))


def test_joint_solve_takes_the_fact_term_too():
    g = torch.Generator().manual_seed(4)
    keys = [torch.randn(12, 6, generator=g) for _ in range(3)]
    residuals = [torch.randn(12, 4, generator=g) for _ in range(3)]
    lams = [torch.tensor(0.0)] * 3
    c0 = [_moment(6, 10 + i).float() for i in range(3)]
    facts = [_moment(6, 20 + i).float() for i in range(3)]
    got, _ = JointClosedFormUpdate(preserve=2.0, preserve_facts=5.0).solve(keys, residuals, lams, key_moments=c0,
                                                                          fact_moments=facts)
    expect, _ = JointClosedFormUpdate(preserve=1.0).solve(keys, residuals, lams,
                                                          key_moments=[2 * c + 5 * f for c, f in zip(c0, facts)])
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fact_term_gradient_equals_autograd():
    g = torch.Generator().manual_seed(2)
    n, shapes = 9, ((6, 4),) * 3
    cap = Capture(keys=[torch.randn(n, 6, generator=g, dtype=torch.float64) for _ in range(3)],
                  value_grads=[torch.randn(n, 4, generator=g, dtype=torch.float64) for _ in range(3)], loss=0.0)
    facts = [_moment(6, 30 + i) for i in range(3)]
    targets = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    mu_f = 4.0
    meta_loss = cubic_meta_loss(targets)

    def make():
        editor = perturbed_editor(shapes, ClosedFormUpdate(preserve_facts=mu_f), facts)
        editor.bind_key_moments(facts, kind="fact")
        return editor

    ref = make()
    rows = [ref._residual_rows(cap, p, slice(None)) for p in range(3)]
    spread = ref.spread([r for _, r in rows], cap.value_grads)
    shifts = [torch.linalg.solve(k.T @ k + torch.exp(ref.hypernet.log_lambda(p)) * torch.eye(6, dtype=torch.float64)
                                 + mu_f * facts[p], k.T @ spread[p]) for p, (k, _) in enumerate(rows)]
    meta_loss(shifts).backward()
    expected = {name: p.grad.clone() for name, p in ref.named_parameters() if p.grad is not None}
    got = pipeline_grads(make(), cap, meta_loss)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-9, msg=name)


def test_fact_term_errors_name_the_missing_piece(tiny_llama, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="fact key moments"):
        ClosedFormUpdate(preserve_facts=1.0).factor(torch.randn(3, 8), torch.tensor(0.0))
    with pytest.raises(ValueError, match="at least 0"):
        ClosedFormUpdate(preserve_facts=-1.0)
    with pytest.raises(ValueError, match="kernel"):
        ClosedFormUpdate("kernel", preserve_facts=1.0)
    monkeypatch.setenv("HORSE_PL_CACHE", str(tmp_path))
    model, tokenizer = load_model(tiny_llama)
    names = ["model.layers.1.mlp.down_proj"]
    editor = perturbed_editor(((64, 32),), ClosedFormUpdate(preserve_facts=1.0), [torch.eye(64)])
    with pytest.raises(ValueError, match="preserve-facts-data"):
        bind_preservation(editor, model, tokenizer, names)
    with pytest.raises(FileNotFoundError, match="no_such.json"):
        bind_preservation(editor, model, tokenizer, names, facts=tmp_path / "no_such.json")


def test_fact_moments_are_cached_by_file_and_limit(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("HORSE_PL_CACHE", str(tmp_path))
    model, tokenizer = load_model(tiny_llama)
    names = ["model.layers.1.mlp.down_proj"]
    first = cached_fact_moments(model, tokenizer, names, ZSRE_EVAL, limit=4)
    again = cached_fact_moments(model, tokenizer, names, ZSRE_EVAL, limit=4)
    other = cached_fact_moments(model, tokenizer, names, ZSRE_EVAL, limit=6)
    assert len(list((tmp_path / "key_stats").glob("*.safetensors"))) == 2
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], other[0])


def test_editor_trained_with_facts_remembers_them_and_they_shrink_the_edit(tiny_llama, tmp_path, monkeypatch):
    from conftest import small_zsre, train_args

    from horse_pl.api import KnowledgeEditor
    from horse_pl.cli import cli
    from horse_pl.export import export_checkpoint, load_editor

    monkeypatch.setenv("HORSE_PL_CACHE", str(tmp_path / "cache"))
    facts = small_zsre()[0]  # the training file's records (their first 4,096)
    update = ('{"class_path": "horse_pl.editing.update.JointClosedFormUpdate", '
              '"init_args": {"preserve": 10.0, "preserve_facts": 100.0}}')
    ckpt = ["--trainer.callbacks+", "lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.dirpath",
            str(tmp_path / "ckpt"), "--trainer.callbacks.save_last", "true"]
    run = cli(["fit"] + train_args(tiny_llama, tmp_path / "run", steps=2, **{"model.update": update,
                                                                            "model.preserve_facts_data": facts})
              + ckpt)
    assert run.model.editor.fact_moments is not None
    export_checkpoint(tmp_path / "ckpt" / "last.ckpt", tmp_path / "editor")
    _, config = load_editor(tmp_path / "editor")
    assert config.update_args["preserve_facts"] == 100.0 and config.training["preserve_facts_data"] == facts
    requests, _ = load_requests(ZSRE_EVAL, "zsre", limit=6)
    norm = {}
    for mu_f in (0.0, 100.0, 1e8):  # the editor's own facts file, no argument needed
        ke = KnowledgeEditor.from_pretrained(tmp_path / "editor", update_args={"preserve_facts": mu_f})
        shifts, _ = ke.edit(requests, merge_shifts=False, score="none")
        norm[mu_f] = sum(float(s.norm()) for s in shifts)
    assert norm[1e8] < norm[100.0] < norm[0.0]
