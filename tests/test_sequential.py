"""MOSE and the additive sequential baselines, the sequential runner, general-ability scoring, recipes."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import CF_EVAL

from horse_pl.data.batch import EVAL_VIEWS, edit_batch
from horse_pl.data.records import load_requests
from horse_pl.lm import answer_ce
from horse_pl.metrics import compute_scores, score_batch
from horse_pl.models import load_model
from horse_pl.sequential import general
from horse_pl.sequential.editors import (
    FineTuneEditor,
    HorseTurnEditor,
    MoseEditor,
    rotation_output_energy,
    stability,
)
from horse_pl.sequential.runner import SequentialConfig, SequentialRun

edit_main = pytest.importorskip("edit").main
MODULES = ["model.layers.2.mlp.down_proj", "model.layers.3.mlp.down_proj"]
ROOT = Path(__file__).resolve().parents[1]


def _turns(tokenizer, n=3, per_turn=1):
    requests, _ = load_requests(CF_EVAL, limit=n)
    return [edit_batch(tokenizer, requests[i:i + per_turn], ("edit",), 8, 128)["edit"].micro_batches
            for i in range(0, n, per_turn)]


def test_mose_rotation_is_orthogonal_and_keeps_the_spectrum(tiny_llama):
    model, tok = load_model(tiny_llama)
    # a large ball so that the rotation moves far from the identity in a few steps
    mose = MoseEditor(model, MODULES, n_blocks=4, steps=10, lr=5e-2, radius_scale=1e-2)
    for turn in _turns(tok):
        mose.edit(turn)
    for q, w, w0, layer in zip(mose.rotations(), mose.weights(), mose.original, mose.layers):
        eye = torch.eye(q.shape[0])
        assert (q - eye).abs().max() > 1e-2  # it did rotate
        assert torch.linalg.matrix_norm(q.T @ q - eye) < 1e-5
        assert torch.allclose(q, torch.block_diag(*[q[i:i + 12, i:i + 12] for i in range(0, 48, 12)]))
        s0, s1 = torch.linalg.svdvals(w0.double()), torch.linalg.svdvals(w.double())
        assert ((s1 - s0).abs() / s0).max() < 1e-5
        x = torch.randn(5, w.shape[1])
        with torch.no_grad():
            assert torch.allclose(layer(x), x @ w.T, atol=1e-5)  # W0 Q^T is what the model computes
    diag = stability(mose.weights(), mose.original)
    s0 = stability(mose.original, mose.original)
    assert diag["condition_number"] == pytest.approx(s0["condition_number"], rel=1e-5)
    assert all(d > 0 for d in diag["drift"])
    assert max(mose.diagnostics()["orthogonality_error"]) < 1e-5


def test_mose_ball_projection_holds(tiny_llama):
    model, tok = load_model(tiny_llama)
    mose = MoseEditor(model, MODULES, n_blocks=4, steps=20, lr=5e-1, radius_scale=1e-4)
    turn = _turns(tok, n=1)[0]
    mose.edit(turn)
    # the projection runs before each forward: one more forward and every block sits inside its ball
    with torch.no_grad():
        model(**{k: v for k, v in turn[0].items() if k != "labels"})
    for norms, radius in zip(mose.skew_norms(), mose.radius):
        assert norms.max() <= radius * (1 + 1e-5)
        assert norms.max() >= radius * 0.5  # the large lr pushed against the constraint


@pytest.mark.parametrize("reference_block", [None, 48])
def test_mose_ball_scaled_to_a_reference_block(tiny_llama, reference_block):
    model, tok = load_model(tiny_llama)
    mose = MoseEditor(model, MODULES, n_blocks=4, steps=20, lr=5e-1, radius_scale=1e-4, reference_block=reference_block)
    block = 48 // 4  # the tiny model's down-projections take 48 inputs
    expected = 1e-4 * block * (reference_block or block) / 2  # scale * n * ref / sqrt(r)
    assert mose.radius == pytest.approx([expected] * len(MODULES))
    mose.edit(_turns(tok, n=1)[0])
    with torch.no_grad():
        model(**{k: v for k, v in _turns(tok, n=1)[0][0].items() if k != "labels"})
    for norms in mose.skew_norms():
        assert expected * 0.5 <= norms.max() <= expected * (1 + 1e-5)


def _random_rotation_blocks(r, n, scale=0.3):
    skew = torch.randn(r, n, n) * scale
    skew = skew - skew.transpose(1, 2)
    eye = torch.eye(n)
    return torch.linalg.solve(eye + skew, eye - skew)  # Cayley: orthogonal blocks


def test_rotation_output_energy_is_the_output_change_on_the_keys():
    torch.manual_seed(0)
    r, n, d_out = 3, 4, 5
    w0 = torch.randn(d_out, r * n)
    keys = torch.randn(50, r * n)
    moments = keys.T @ keys / len(keys)
    q, q_ref = _random_rotation_blocks(r, n), _random_rotation_blocks(r, n)
    dense, dense_ref = torch.block_diag(*q), torch.block_diag(*q_ref)
    change = keys @ (w0 @ dense.T).T - keys @ w0.T  # what the rotated layer outputs minus the unedited outputs
    assert rotation_output_energy(w0, q, None, moments) == pytest.approx(float(change.pow(2).sum(1).mean()), rel=1e-4)
    change = keys @ (w0 @ dense.T).T - keys @ (w0 @ dense_ref.T).T
    assert rotation_output_energy(w0, q, q_ref, moments) == pytest.approx(float(change.pow(2).sum(1).mean()), rel=1e-4)
    q.requires_grad_(True)  # the charge MOSE's steps descend: differentiable in the rotation
    rotation_output_energy(w0, q, None, moments).backward()
    assert q.grad is not None and float(q.grad.abs().sum()) > 0


def test_mose_sgd_steps_along_the_gradient_and_target_stops_a_landed_request(tiny_llama):
    model, tok = load_model(tiny_llama)
    turn = _turns(tok, n=1)[0]
    lr = 1e-2
    mose = MoseEditor(model, MODULES, steps=1, lr=lr, radius_scale=1.0, optimizer="sgd")
    with torch.enable_grad():
        answer_ce(model, turn[0]).backward()
    grads = [p.grad.clone() for p in mose.params]
    for p in mose.params:
        p.grad = None
    mose.edit(turn)
    for p, g in zip(mose.params, grads):
        assert torch.allclose(p.detach(), -lr * g, atol=1e-7)  # one plain gradient step, not Adam's sign-like one
    # a request already at the target probability takes no step; a turn that has not landed takes all of them
    landed = MoseEditor(load_model(tiny_llama)[0], MODULES, steps=5, lr=lr, radius_scale=1.0, target=1e-12)
    assert landed.edit(turn) == [] and all(float(p.detach().abs().max()) == 0 for p in landed.params)
    pulling = MoseEditor(load_model(tiny_llama)[0], MODULES, steps=5, lr=lr, radius_scale=1.0, target=0.999)
    assert len(pulling.edit(turn)) == 5


def _unrelated_moments(model, tok, modules):
    from horse_pl.edit_modules import get_modules
    from horse_pl.editing.key_stats import key_second_moments

    texts = ["The weather was mild for most of the week.", "She opened the window and read the letter twice."]
    return key_second_moments(model, tok, get_modules(model, modules), texts)


def test_mose_preserve_charges_the_output_change_on_unrelated_keys(tiny_llama):
    turn = _turns(load_model(tiny_llama)[1], n=1)[0]
    energies = []
    # plain gradient steps stay stable while lr x preserve x the charge's curvature is small
    for preserve in (0.0, 1.0):
        model, tok = load_model(tiny_llama)
        moments = _unrelated_moments(model, tok, MODULES)
        mose = MoseEditor(model, MODULES, steps=10, lr=0.5, radius_scale=1.0, optimizer="sgd", preserve=preserve,
                          key_moments=moments)
        losses = mose.edit(turn)
        energies.append(float(mose._charge(mose.key_moments, None).detach()))
        assert energies[-1] > 0
    assert energies[1] < 0.5 * energies[0]
    with pytest.raises(ValueError, match="key moments"):
        MoseEditor(load_model(tiny_llama)[0], MODULES, preserve=1.0)
    with pytest.raises(ValueError, match="'adam' or 'sgd'"):
        MoseEditor(load_model(tiny_llama)[0], MODULES, optimizer="lbfgs")
    assert losses and all(math.isfinite(v) for v in losses)


def test_mose_keep_edits_charges_a_turn_for_moving_earlier_edits_outputs(tiny_llama):
    from horse_pl.editing.key_stats import edit_key_sums

    tok = load_model(tiny_llama)[1]
    first, second = _turns(tok, n=2)
    moved = []
    for keep in (0.0, 1.0):
        model, _ = load_model(tiny_llama)
        mose = MoseEditor(model, MODULES, steps=10, lr=0.5, radius_scale=1.0, optimizer="sgd", keep_edits=keep,
                          key_moments=_unrelated_moments(model, tok, MODULES))
        mose.edit(first)
        if keep:  # the memory is the first turn's prompts' key second moment, on the model after that turn
            sums = edit_key_sums(model, mose.layers, first, "all")
            n_tokens = sum(int(mb["attention_mask"].sum()) for mb in first)
            for m, s in zip(mose.edit_moments, sums):
                assert torch.allclose(m, s.float() / n_tokens, rtol=1e-4, atol=1e-6)
        before = [q.detach() for q in mose._blocks()]
        memory = [s.float() for s in edit_key_sums(model, mose.layers, first, "all")]
        mose.edit(second)
        moved.append(sum(float(rotation_output_energy(w0, q.detach(), b, m))
                         for w0, q, b, m in zip(mose.original, mose._blocks(), before, memory)))
    assert 0 < moved[1] < 0.5 * moved[0]


def test_edit_key_sums_regrouped_equal_one_pass_per_turn(tiny_llama):
    """A lifelong refresh regroups many small turns' prompts into larger batches: the same sums as one pass per turn
    (right padding changes nothing a causal model computes at the real tokens)."""
    from horse_pl.editing.key_stats import edit_key_sums, regrouped

    model, tok = load_model(tiny_llama)
    layers = [m for _, m in model.named_modules() if _ in MODULES]
    turns = _turns(tok, n=7, per_turn=2)  # prompts of several lengths, the last turn of one
    micro_batches = [mb for turn in turns for mb in turn]
    for positions in ("answer", "all"):
        per_turn = [sum(s) for s in zip(*(edit_key_sums(model, layers, turn, positions) for turn in turns))]
        for rows in (3, 32):
            together = edit_key_sums(model, layers, micro_batches, positions, rows=rows)
            for a, b in zip(per_turn, together):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    left_padded = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="padded on the left"):
        list(regrouped([(torch.ones(2, 3, dtype=torch.long), left_padded, left_padded.bool())], 4))


def test_mose_rotation_state_persists_across_requests(tiny_llama):
    model, tok = load_model(tiny_llama)
    lr = 1e-3
    mose = MoseEditor(model, MODULES, steps=5, lr=lr, radius_scale=1e-1)
    first, second = _turns(tok, n=2)
    mose.edit(first)
    after_first = [p.detach().clone() for p in mose.params]
    assert all(p.abs().max() > 0 for p in after_first)
    mose.steps = 1
    mose.edit(second)
    for p, p1 in zip(mose.params, after_first):
        # one Adam step moves each entry by at most ~lr from where the first request left it
        assert 0 < (p.detach() - p1).abs().max() <= lr * 1.01


def test_finetune_is_additive_and_constrained_per_request(tiny_llama):
    model, tok = load_model(tiny_llama)
    ft = FineTuneEditor(model, MODULES, steps=10, lr=1e-2, norm_constraint=1e-3)
    turns = _turns(tok, n=2)
    ft.edit(turns[0])
    assert max(float(s.abs().max()) for s in ft.shifts) == pytest.approx(1e-3, rel=1e-5)
    ft.edit(turns[1])
    assert max(float(s.abs().max()) for s in ft.shifts) <= 2e-3 + 1e-7
    for layer, w in zip(ft.layers, ft.weights()):
        x = torch.randn(4, w.shape[1])
        with torch.no_grad():
            assert torch.allclose(layer(x), x @ w.T, atol=1e-5)
    assert all(d > 0 for d in stability(ft.weights(), ft.original)["drift"])


def test_horse_turns_merge_each_turns_shifts(editor_dir, tiny_llama):
    from horse_pl.export import load_editor

    model, tok = load_model(tiny_llama)
    editor, config = load_editor(editor_dir / "editor")
    horse = HorseTurnEditor(model, editor, config.edit_modules)
    weights = horse.weights()
    for turn in _turns(tok, n=2):
        # the turn's shifts computed on the model as it is before the turn, then merged
        with torch.no_grad():
            expected = editor.param_shifts(editor.capture(model, horse.layers, turn)).param_shifts
        horse.edit(turn)
        now = horse.weights()
        for before, after, shift in zip(weights, now, expected):
            assert shift.abs().max() > 0
            assert torch.allclose(after, before + shift.T, atol=1e-6)
        weights = now


def _shift_on(memory: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> float:
    """``||K dW||_F^2`` of a turn's shift ``dW`` on the keys whose ``K^T K`` is ``memory``."""
    shift = (after - before).T.double()
    return float((shift * (memory @ shift)).sum())


def test_lifelong_turns_keep_earlier_edits_keys(editor_dir, tiny_llama):
    from horse_pl.export import load_editor

    turns = None
    shares = {}
    for keep in (0.0, 1e6):
        model, tok = load_model(tiny_llama)
        turns = turns or _turns(tok, n=2)
        editor, config = load_editor(editor_dir / "editor")
        horse = HorseTurnEditor(model, editor, config.edit_modules, keep_edits=keep, preserve=0.0)
        assert horse.name == "horse_lifelong"
        horse.edit(turns[0])
        first = [m.clone() for m in horse.memory]  # K1^T K1 of each module
        before = horse.weights()
        horse.edit(turns[1])
        after = horse.weights()
        # the second turn's shift on the first turn's keys, against its size on its own keys
        shares[keep] = [_shift_on(m1, b, a) / _shift_on(m2 - m1, b, a)
                        for m1, m2, b, a in zip(first, horse.memory, before, after)]
    assert min(shares[0.0]) > 1e-3  # forgetting turn 1's keys, turn 2 moves their outputs
    assert max(shares[1e6]) < 1e-4 * min(shares[0.0])  # keeping them, it leaves them (almost) alone


def test_lifelong_without_memory_is_the_plain_turn(editor_dir, tiny_llama):
    from horse_pl.export import load_editor

    results = []
    for lifelong in (False, True):
        model, tok = load_model(tiny_llama)
        editor, config = load_editor(editor_dir / "editor")
        kwargs = {"keep_edits": 0.0, "preserve": 0.0} if lifelong else {}
        horse = HorseTurnEditor(model, editor, config.edit_modules, **kwargs)
        for turn in _turns(tok, n=2):
            horse.edit(turn)
        results.append(horse.weights())
    for plain, lifelong in zip(*results):
        assert torch.allclose(plain, lifelong, atol=1e-5)


def _config(tiny_llama, methods, **kw):
    return SequentialConfig(methods=methods, model=tiny_llama, edit_modules="layers:2-3", steps=3, lr=1e-2,
                            diag_every=2, general_tasks=("sst2",), general_limit=8, **kw)


def test_runner_scores_after_post_on_the_final_model(tiny_llama, tmp_path):
    requests, _ = load_requests(CF_EVAL, limit=5)
    run = SequentialRun(_config(tiny_llama, ("mose",), turn_size=2, radius_scale=1e-2), requests, tmp_path)
    report = run.run()
    result = report["methods"]["mose"]
    assert [d["n_edits"] for d in result["diagnostics"]] == [0, 2, 4, 5]
    # after-post = every request scored on the final model, against the unedited locality argmax
    tok = run.tokenizer
    batch = edit_batch(tok, requests[:5], EVAL_VIEWS, 32, 256)
    values = compute_scores(score_batch(run.final_model, batch, EVAL_VIEWS), run.chunk_locality[0])
    for name in ("ES", "GS", "LS", "LS_agree", "efficacy", "paraphrase", "neighborhood"):
        assert result["after_post"][name] == pytest.approx(float(values[name].mean()), abs=1e-6), name
    assert set(report["general_tasks"]["sst2"]) == {"chance", "unedited", "n", "kept"}
    assert "perplexity" in result["general_after"] and result["retention"]["perplexity"] > 0
    assert (tmp_path / "diagnostics.png").stat().st_size > 1000
    assert json.loads((tmp_path / "sequential_report.json").read_text())["n_requests"] == 5


def test_runner_builds_mose_with_its_own_rate_and_the_unedited_models_key_moments(tiny_llama):
    from horse_pl.edit_modules import get_modules, resolve_edit_modules
    from horse_pl.editing.key_stats import key_second_moments, preservation_texts
    from horse_pl.sequential.runner import build_editor

    cfg = _config(tiny_llama, ("mose",), general_data=str(GENERAL), mose_optimizer="sgd", mose_lr=0.25,
                  mose_target=0.4, mose_preserve=10.0)
    model, tok = load_model(tiny_llama)
    names = resolve_edit_modules(model, cfg.edit_modules)
    expected = key_second_moments(model, tok, get_modules(model, names), preservation_texts(GENERAL))
    mose = build_editor("mose", model, cfg, names)
    assert (mose.lr, mose.optimizer, mose.target, mose.preserve, mose.keep_edits) == (0.25, "sgd", 0.4, 10.0, 0.0)
    for m, e in zip(mose.key_moments, expected):
        assert torch.allclose(m, e, rtol=1e-4, atol=1e-6)
    assert build_editor("mose", load_model(tiny_llama)[0], _config(tiny_llama, ("mose",)), names).lr == 1e-2


def test_runner_curve_scores_the_edits_done_so_far(tiny_llama, tmp_path):
    requests, _ = load_requests(CF_EVAL, limit=5)
    run = SequentialRun(_config(tiny_llama, ("ft",), curve_every=2), requests, tmp_path)
    result = run.run()["methods"]["ft"]
    assert [(p["n_edits"], p["n_scored"]) for p in result["curve"]] == [(2, 2), (4, 4), (5, 5)]
    assert result["curve"][-1]["after_post"] == result["after_post"]
    assert result["curve"][-1]["retention"] == result["retention"]
    assert all("perplexity" in p["retention"] for p in result["curve"])


def test_post_views_limit_the_scores_after_each_turn_not_the_final_ones(tiny_llama, tmp_path, capsys):
    import edit

    out = tmp_path / "seq"
    assert edit_main(["sequential", "--method", "ft", "--model", tiny_llama, "--requests", str(CF_EVAL), "--limit", "3",
                      "--edit-modules", "layers:2-3", "--steps", "2", "--general-data", "none",
                      "--post-views", "edit", "edit_true", "--out", str(out)]) == 0
    result = json.loads((out / "sequential_report.json").read_text())["methods"]["ft"]
    assert set(result["post"]) == {"ES", "EM_edit", "efficacy"}
    assert {"GS", "LS_agree", "paraphrase", "neighborhood"} <= set(result["after_post"])
    assert result["per_request_post"][0].keys() == {"ES", "efficacy"}
    post_row = next(line for line in capsys.readouterr().out.splitlines() if line.split()[:2] == ["ft", "post"])
    assert post_row.split()[2:] == [f"{result['post']['efficacy']:.3f}", "-", "-", f"{result['post']['ES']:.3f}",
                                    "-", "-"]
    with pytest.raises(ValueError, match="--post-views has 'edits', which is not a view"):
        _config(tiny_llama, ("ft",), post_views=("edits",)).check()
    with pytest.raises(edit.UsageError, match="invalid choice: 'edits'"):
        edit.parse(["sequential", "--out", "x", "--post-views", "edits"])


def test_method_settings_apply_to_their_method_only(tiny_llama, tmp_path):
    requests, _ = load_requests(CF_EVAL, limit=2)
    cfg = _config(tiny_llama, ("mose", "ft"), method_settings={"mose": {"edit_modules": "layers:3", "lr": "1e-3",
                                                                        "mose_optimizer": "sgd"}})
    mose, ft = cfg.for_method("mose"), cfg.for_method("ft")
    assert (mose.lr, mose.edit_modules, mose.mose_optimizer, mose.method_settings) == (1e-3, "layers:3", "sgd", {})
    assert (ft.lr, ft.edit_modules, ft.mose_optimizer) == (1e-2, "layers:2-3", "adam")
    report = SequentialRun(cfg, requests, tmp_path).run()
    # each method edited its own layers: one matrix for mose, two for ft
    assert len(report["methods"]["mose"]["diagnostics"][-1]["condition_number"]) == 1
    assert len(report["methods"]["ft"]["diagnostics"][-1]["condition_number"]) == 2
    assert report["config"]["method_settings"]["mose"]["edit_modules"] == "layers:3"


@pytest.mark.parametrize("settings, match", [
    ({"hors": {"lr": 1.0}}, "settings for 'hors', which is not a sequential method"),
    ({"horse": {"lr": 1.0}}, None),  # a recipe's method that --method leaves out: kept for when it runs
    ({"horse": {"lrr": 1.0}}, "'lrr' of 'horse' is not a setting"),
    ({"mose": {"turn_size": 2}}, "'turn_size' of 'mose' is not a setting one method can have alone"),
    ({"mose": {"stepz": 2}}, "'stepz' of 'mose' is not a setting"),
    ({"mose": 3}, "'mose' must map setting names to values"),
    ({"mose": {"lr": "fast"}}, "'lr' of 'mose' must be a number, not 'fast'"),
    ({"ft": {"refine_anchor": True, "refine": 0}}, None),  # a horse-only setting on ft is harmless
])
def test_method_settings_refuse_what_cannot_apply(tiny_llama, settings, match):
    cfg = _config(tiny_llama, ("mose", "ft"), method_settings=settings)
    if match is None:
        cfg.check()
        return
    with pytest.raises(ValueError, match=match):
        cfg.check()


def test_method_settings_from_the_command_line_and_recipes(tiny_llama, tmp_path):
    import edit

    recipe = str(ROOT / "configs" / "sequential" / "mose_smollm2_counterfact.yaml")
    args = edit.parse(["--config", recipe, "--out", "x", "--method-settings", "{mose: {lr: 1e-3, steps: 5}}"])
    assert args.method_settings["mose"]["steps"] == 5
    # YAML reads 1e-3 as text: the method's settings are numbers of the field's type
    assert SequentialConfig(methods=("mose",), method_settings=args.method_settings).for_method("mose").lr == 1e-3
    with pytest.raises(edit.UsageError, match="must be a YAML mapping"):
        edit.parse(["--config", recipe, "--out", "x", "--method-settings", "[1, 2]"])
    bench_recipe = ROOT / "configs" / "sequential" / "lifelong_benchmark_smollm2_counterfact.yaml"
    bench = edit.parse(["--config", str(bench_recipe), "--out", "x"])
    assert bench.method_settings["horse_lifelong"]["refine"] == 10 and bench.refine is None


def test_edit_py_sequential_runs_every_method(tiny_llama, editor_dir, tmp_path, capsys):
    out = tmp_path / "seq"
    args = ["--sequential", "--method", "mose", "ft", "horse", "horse_lifelong", "--editor", str(editor_dir / "editor"),
            "--model", tiny_llama, "--requests", str(CF_EVAL), "--limit", "3", "--edit-modules", "layers:2-3",
            "--steps", "2", "--general-tasks", "sst2", "--general-limit", "6", "--curve-every", "2", "--out", str(out)]
    assert edit_main(args) == 0
    report = json.loads((out / "sequential_report.json").read_text())
    assert set(report["methods"]) == {"mose", "ft", "horse", "horse_lifelong"}
    # the result record: summaries, curve and stability of every method, no per-request rows
    record = json.loads((out / "seq.json").read_text())
    assert record["kind"] == "sequential" and record["command"].startswith("python edit.py --sequential")
    for method, result in record["methods"].items():
        assert result["after_post"] == report["methods"][method]["after_post"]
        assert [p["n_edits"] for p in result["curve"]] == [2, 3]
        assert "per_request_post" not in result and len(result["stability"]["condition_number"]) == 2
        curve = result["stability_curve"]  # every diagnostic point, means over the edited matrices
        assert [row["n_edits"] for row in curve] == [d["n_edits"] for d in report["methods"][method]["diagnostics"]]
        assert curve[-1]["drift"] == pytest.approx(sum(result["stability"]["drift"]) / 2)
    # lifelong with C0 reports how stale its bound C0 and earlier keys are on the edited model
    assert "memory_staleness" in record["methods"]["horse_lifelong"]["stability_curve"][-1]
    assert (out / "curve.png").stat().st_size > 1000
    assert "orthogonality_error" in report["methods"]["mose"]["diagnostics"][-1]
    assert (out / "tb" / "mose").is_dir() and (out / "diagnostics.png").exists()
    table = capsys.readouterr().out
    assert "after_post" in table and "efficacy" in table
    assert edit_main(args) == 2  # an existing --out is kept
    assert "already exists" in capsys.readouterr().err


def test_sequential_recipes_parse(tmp_path, capsys):
    import edit

    recipes = sorted((ROOT / "configs" / "sequential").glob("*.yaml"))
    assert {r.stem for r in recipes} >= {"mose_smollm2_counterfact", "mose_smollm2_zsre", "mose_llama3_8b_counterfact",
                                         "mose_qwen2_5_7b_counterfact", "mose_llama2_13b_counterfact"}
    for recipe in recipes:
        for argv in (["sequential", "--config", str(recipe), "--out", "x"], ["--config", str(recipe), "--out", "x"]):
            args = edit.parse(argv)  # the recipe's own command, named or not
            assert args.command == "sequential" and args.methods and Path(ROOT, args.requests).exists(), recipe
            assert args.edit_modules.startswith("layers:"), recipe
    # a yes/no setting is a flag: --name sets it, --no-name clears the recipe's value, default off
    recipe = str(ROOT / "configs" / "sequential" / "mose_smollm2_counterfact.yaml")
    assert not edit.parse(["sequential", "--config", recipe, "--out", "x"]).refine_anchor  # the config's default
    assert edit.parse(["sequential", "--config", recipe, "--out", "x", "--refine-anchor"]).refine_anchor is True
    anchored = tmp_path / "anchored.yaml"
    anchored.write_text(Path(recipe).read_text() + "\nrefine_anchor: true\n")
    assert edit.parse(["--config", str(anchored), "--out", "x"]).refine_anchor is True
    assert edit.parse(["--config", str(anchored), "--out", "x", "--no-refine-anchor"]).refine_anchor is False
    args = edit.parse(["--config", recipe, "--out", "x", "--mose-optimizer", "sgd", "--mose-preserve", "100",
                       "--mose-lr", "1e-3"])
    assert (args.mose_optimizer, args.mose_preserve, args.mose_target, args.mose_lr) == ("sgd", 100.0, None, 1e-3)
    with pytest.raises(edit.UsageError, match="invalid choice: 'lbfgs'"):
        edit.parse(["--config", recipe, "--out", "x", "--mose-optimizer", "lbfgs"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("sequential: true\nstep: 3\n")
    assert edit_main(["--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "unknown keys ['step']" in capsys.readouterr().err


GENERAL = ROOT.parent / "shared" / "data" / "general"


def test_general_tasks_load_and_score(tiny_llama):
    for name in general.TASKS:
        examples = general.load_task(GENERAL, name, 20)
        assert len(examples) == 20 and all(0 <= e.label < len(e.choices) for e in examples)
    qa = general.load_task(GENERAL, "open_domain_qa", 20)
    assert len(qa) == 20 and all(q.endswith("?\nAnswer:") and a for q, a in qa)
    assert general.above_chance(0.7, 0.5, 200) and not general.above_chance(0.55, 0.5, 200)
    r = general.retention({"a": 0.8, "b": 0.5, "perplexity": 10.0}, {"a": 0.4, "b": 0.5, "perplexity": 20.0}, ["a"])
    assert r == {"a": 0.5, "mean": 0.5, "perplexity": 0.5}
    assert general.retention({"perplexity": 2.0}, {"perplexity": 2.0}, [])["mean"] is None
    with pytest.raises(ValueError, match="Unknown general task 'glue'"):
        general.load_task(GENERAL, "glue", 5)
    model, tok = load_model(tiny_llama)
    examples = general.load_task(GENERAL, "sst2", 8)
    acc = general.choice_accuracy(model, tok, examples)
    assert acc == general.choice_accuracy(model, tok, list(reversed(examples)))  # order-independent
    assert general.chance_level("open_domain_qa", general.load_task(GENERAL, "open_domain_qa", 8), tok) == 1 / len(tok)
    # QA accuracy and perplexity against a hand computation: plain full forward passes, one example at a time
    from horse_pl.data.tokenize import join

    def answer_tokens(prompt, answer):
        text, tail = join(prompt, answer)
        ids = tok(text, return_tensors="pt").input_ids
        n = len(tok(text[:len(text) - len(tail)]).input_ids)
        return ids, n

    # the real questions (the tiny random model gets none right) and the same questions with the model's own greedy
    # continuation as the answer (mostly right), so the comparison checks a fraction that is neither 0 nor 1
    own = []
    for q, _ in qa[:4]:
        ids = tok(q, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        own.append((q, tok.decode(out[0, ids.shape[1]:]).strip() or "x"))
    examples = qa[:4] + own
    by_hand = []
    for q, a in examples:
        ids, n = answer_tokens(q, a)
        with torch.no_grad():
            pred = model(ids).logits[0, n - 1:-1].argmax(-1)
        by_hand.append(float((pred == ids[0, n:]).float().mean()))
    assert 0 < sum(by_hand) / len(by_hand) < 1, by_hand
    assert general.qa_accuracy(model, tok, examples) == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-6)
    texts = ["a short text", "another one here"]
    nll, count = 0.0, 0
    for text in texts:
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    assert general.perplexity(model, tok, texts) == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_retention_of_scores_only_the_counted_tasks(tiny_llama, monkeypatch):
    model, tok = load_model(tiny_llama)
    check = general.GeneralCheck(tok, GENERAL, ("open_domain_qa", "sst2"), 6)
    with pytest.raises(RuntimeError, match="call baseline first"):
        check.retention_of(model)
    check.baseline(model)
    check.kept = ["sst2"]  # as if the unedited model were clearly above chance on sst2 only
    full = check.retention(check.score(model))
    scored = []
    real = general.general_abilities
    monkeypatch.setattr(general, "general_abilities", lambda m, t, r, tasks, limit: scored.append(tasks) or
                        real(m, t, r, tasks, limit))
    assert check.retention_of(model) == full and scored == [["sst2"]]
    assert set(full) == {"sst2", "mean", "perplexity"}


def test_turns_with_preserve_facts_solve_with_the_known_facts_term(editor_dir, tiny_llama, tmp_path, monkeypatch):
    from conftest import small_zsre

    from horse_pl.editing.key_stats import cached_fact_moments
    from horse_pl.export import load_editor
    from horse_pl.sequential.runner import build_editor

    monkeypatch.setenv("HORSE_PL_CACHE", str(tmp_path))
    facts, mu_f = small_zsre()[0], 1e5
    model, tok = load_model(tiny_llama)
    cfg = _config(tiny_llama, ["horse_lifelong"], editor=str(editor_dir / "editor"), preserve_facts=mu_f,
                  preserve_facts_data=facts)
    horse = build_editor("horse_lifelong", model, cfg, [])
    assert horse.editor.update.preserve_facts == mu_f and horse.editor.fact_moments is not None
    moments = cached_fact_moments(model, tok, horse.edit_modules, facts)
    turn = _turns(tok, n=1)[0]
    # the first turn (no memory yet) is the editor's own solve with mu_f F as its preservation term
    reference, _ = load_editor(editor_dir / "editor", {"preserve": mu_f})
    reference.bind_key_moments(moments)
    plain, _ = load_editor(editor_dir / "editor")
    with torch.no_grad():
        expected = reference.param_shifts(reference.capture(model, horse.layers, turn)).param_shifts
        without = plain.param_shifts(plain.capture(model, horse.layers, turn)).param_shifts
    before = horse.weights()
    horse.edit(turn)
    for b, a, shift, other in zip(before, horse.weights(), expected, without):
        scale = float(shift.abs().max())
        assert scale > 0 and torch.allclose(a - b, shift.T, rtol=0, atol=1e-3 * scale)
        assert float((shift - other).norm()) > 0.05 * float(other.norm())  # the term changes the solve
    with pytest.raises(ValueError, match="preserve-facts-data"):
        no_file = _config(tiny_llama, ["horse"], editor=str(editor_dir / "editor"), preserve_facts=1.0)
        build_editor("horse", load_model(tiny_llama)[0], no_file, [])


def test_lifelong_turns_refine_their_residuals_through_the_turn_solve(editor_dir, tiny_llama, tmp_path, monkeypatch):
    """``--refine K`` in a sequential run: each turn's residuals are refined on its edit prompts through that turn's
    own solve (lifelong: mu C0 + nu * earlier keys), and ``--refine-preserve`` charges the change on C0 itself."""
    from horse_pl.editing.editor import Refinement
    from horse_pl.editing.key_stats import cached_key_moments
    from horse_pl.export import load_editor
    from horse_pl.sequential.runner import build_editor

    monkeypatch.setenv("HORSE_PL_CACHE", str(tmp_path))
    mu, refinement = 1e2, Refinement(steps=3, lr=0.5, preserve=1.0)
    model, tok = load_model(tiny_llama)
    cfg = _config(tiny_llama, ["horse_lifelong"], editor=str(editor_dir / "editor"), lifelong_preserve=mu,
                  refine=3, refine_lr=0.5, refine_preserve=1.0)
    horse = build_editor("horse_lifelong", model, cfg, [])
    assert horse.refinement == refinement and horse.unrelated is not None
    moments = cached_key_moments(model, tok, horse.edit_modules, GENERAL)
    turn = _turns(tok, n=1)[0]
    # the first turn (no memory yet): the editor's solve with mu C0, refined with the C0 charge
    reference, _ = load_editor(editor_dir / "editor", {"preserve": mu})
    reference.bind_key_moments(moments)
    with torch.no_grad():
        state = reference.param_shifts(reference.capture(model, horse.layers, turn))
    refined = reference.refine(model, horse.layers, turn, state, refinement).param_shifts
    before = horse.weights()
    horse.edit(turn)
    for b, a, shift, one_step in zip(before, horse.weights(), refined, state.param_shifts):
        scale = float(shift.abs().max())
        assert torch.allclose(a - b, shift.T, rtol=0, atol=1e-3 * scale)
        assert float((shift - one_step).norm()) > 0.01 * float(one_step.norm())  # the refinement moved it
    with pytest.raises(ValueError, match="refinement target"):
        _config(tiny_llama, ["horse"], editor=str(editor_dir / "editor"), refine=2, refine_target=0.0).check()


def test_anchored_lifelong_turns_charge_the_shift_the_model_already_carries(editor_dir, tiny_llama, tmp_path,
                                                                            monkeypatch):
    """``--refine-anchor``: each turn's refinement is charged for ``W - W0`` as it is before the turn (nothing on the
    first turn, the first turn's merged shift on the second), and the option is refused without a preserve charge."""
    from horse_pl.sequential.runner import build_editor

    monkeypatch.setenv("HORSE_PL_CACHE", str(tmp_path))
    model, tok = load_model(tiny_llama)
    cfg = _config(tiny_llama, ["horse_lifelong"], editor=str(editor_dir / "editor"), lifelong_preserve=1e2,
                  refine=2, refine_lr=0.5, refine_preserve=1.0, refine_anchor=True)
    horse = build_editor("horse_lifelong", model, cfg, [])
    charged, refine = [], horse.editor.refine

    def spy(*args, applied_shifts=None, **kwargs):
        charged.append([a.clone() for a in applied_shifts])
        return refine(*args, applied_shifts=applied_shifts, **kwargs)
    monkeypatch.setattr(horse.editor, "refine", spy)
    turns = _turns(tok, n=2)
    horse.edit(turns[0])
    first = [(w - w0).T for w, w0 in zip(horse.weights(), horse.original)]
    horse.edit(turns[1])
    assert all(float(a.abs().max()) == 0 for a in charged[0])
    for got, want in zip(charged[1], first):
        assert float(want.abs().max()) > 0
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="--refine-anchor"):
        _config(tiny_llama, ["horse_lifelong"], editor=str(editor_dir / "editor"), refine=2,
                refine_anchor=True).check()


def test_lifelong_keys_go_stale_above_the_lowest_edit_module_and_refresh_recomputes_them(editor_dir, tiny_llama,
                                                                                         tmp_path, monkeypatch):
    """A turn's edit to layer 2 moves layer 3's keys: the lifelong diagnostics say how far the bound C0 and earlier
    keys are from the edited model's, and ``refresh_every`` recomputes them there (the same rows capture solves for)."""
    from horse_pl.editing.key_stats import key_second_moments, preservation_texts
    from horse_pl.sequential.runner import build_editor

    monkeypatch.setenv("HORSE_PL_CACHE", str(tmp_path))
    turns = None
    for refresh, refresh_c0 in ((0, None), (1, 0), (1, None)):
        model, tok = load_model(tiny_llama)
        turns = turns or _turns(tok, n=2)
        cfg = _config(tiny_llama, ["horse_lifelong"], editor=str(editor_dir / "editor"), lifelong_preserve=1e2,
                      refresh_every=refresh, refresh_c0_every=refresh_c0)
        horse = build_editor("horse_lifelong", model, cfg, [])
        assert horse.diagnostics() == {"memory_staleness": [0.0, 0.0], "c0_staleness": [0.0, 0.0],
                                       "drift_energy_c0": [0.0, 0.0], "drift_energy_heldout": [0.0, 0.0]}
        horse.edit(turns[0])
        diag = horse.diagnostics()
        if refresh_c0 == 0:  # the keys refreshed every turn, C0 never
            assert max(diag["memory_staleness"]) < 1e-6 and diag["c0_staleness"][1] > 1e-5
            continue
        if not refresh:
            # layer 2's input does not depend on layer 2's own weight; layer 3's does, through layer 2's output
            assert diag["memory_staleness"][0] < 1e-6 and diag["c0_staleness"][0] < 1e-6
            assert diag["memory_staleness"][1] > 1e-5 and diag["c0_staleness"][1] > 1e-5
            # the held-out drift energy is each module's mean ||(W - W0) k||^2 over the perplexity sample's tokens
            ppl_texts = general.perplexity_texts(cfg.general_data)
            inputs: list[list[torch.Tensor]] = [[], []]
            hooks = [m.register_forward_hook(lambda mod, args, out, into=into: into.append(args[0].detach()))
                     for into, m in zip(inputs, horse.layers)]
            masks = []
            for start in range(0, len(ppl_texts), 16):
                enc = tok(ppl_texts[start:start + 16], return_tensors="pt", padding=True, truncation=True,
                          max_length=128)
                masks.append(enc["attention_mask"].bool())
                with torch.no_grad():
                    model(**enc)
            for h in hooks:
                h.remove()
            for i, (w, w0) in enumerate(zip(horse.weights(), horse.original)):
                k = torch.cat([x[m] for x, m in zip(inputs[i], masks)]).double()
                expected = float(((k @ (w - w0).double().T) ** 2).sum(-1).mean()
                                 / ((k @ w0.double().T) ** 2).sum(-1).mean())
                assert expected > 0
                assert diag["drift_energy_heldout"][i] == pytest.approx(expected, rel=1e-4)
                assert diag["drift_energy_c0"][i] > 0
            # one turn: its own energy is the total's where C0 has not moved (layer 2), on the same reference
            assert diag["turn_energy_sum_c0"][0] == pytest.approx(diag["drift_energy_c0"][0], rel=1e-4)
            continue
        assert max(diag["memory_staleness"] + diag["c0_staleness"]) < 1e-6
        # refreshed on the edited model: the earlier turn's keys as capture records them now, C0 of the same texts
        keys = horse.editor.capture(model, horse.layers, turns[0]).keys
        texts = preservation_texts(cfg.general_data)
        for memory, k, c0, now in zip(horse.memory, keys, horse.c0, key_second_moments(model, tok, horse.layers,
                                                                                          texts)):
            assert torch.allclose(memory, k.double().T @ k.double(), rtol=1e-4, atol=1e-4 * float(memory.abs().max()))
            assert torch.allclose(c0, now, rtol=1e-5, atol=1e-6)
        assert horse.unrelated is horse.c0 or horse.unrelated is None
        horse.edit(turns[1])  # the next solve binds the refreshed matrices
        assert len(horse.turn_batches) == 2
        # two turns: the sum of each turn's own energy differs from the total's (cross terms), both positive
        diag = horse.diagnostics()
        assert min(diag["turn_energy_sum_c0"]) > 0
        assert diag["turn_energy_sum_c0"] != pytest.approx(diag["drift_energy_c0"], rel=1e-3)
    with pytest.raises(ValueError, match="horse_lifelong method only"):
        _config(tiny_llama, ["horse"], editor=str(editor_dir / "editor"), refresh_every=2).check()
    with pytest.raises(ValueError, match="--refresh-c0-every -1 must be 0 or a number"):
        _config(tiny_llama, ["horse_lifelong"], editor=str(editor_dir / "editor"), refresh_c0_every=-1).check()
