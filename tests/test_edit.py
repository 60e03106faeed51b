"""Export, edit.py, deltas and the Python API on a tiny model."""

import hashlib
import json

import pytest
import torch
from conftest import SHARED, ZSRE_EVAL, ZSRE_TRAIN

from horse_pl.api import KnowledgeEditor, apply_delta
from horse_pl.data.records import load_requests
from horse_pl.export import load_editor
from horse_pl.export import main as export_main
from horse_pl.models import load_model

edit_main = pytest.importorskip("edit").main


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_export_is_self_contained_and_reproducible(editor_dir, tiny_llama, capsys):
    editor, config = load_editor(editor_dir / "editor")
    assert config.method == "horse" and config.spread == "gram_schmidt" and config.base_model == tiny_llama
    assert config.training["train_sha256"] and config.training["global_step"] == 3
    assert {"torch", "transformers", "lightning", "horse_pl"} <= set(config.versions)
    ckpt = torch.load(editor_dir / "ckpt" / "last.ckpt", weights_only=False)
    for name, value in editor.state_dict().items():
        assert torch.equal(value, ckpt["state_dict"][f"editor.{name}"]), name
    assert int(editor.micro_batch_rows) == 4  # the training micro-batch size (--data.batch_size 4), kept
    # editors saved before micro_batch_rows existed still load, with it unknown
    older = {k: v for k, v in editor.state_dict().items() if k != "micro_batch_rows"}
    editor.load_state_dict(older)
    assert int(editor.micro_batch_rows) == 0
    # and such a checkpoint exports with the data module's micro-batch size
    del ckpt["state_dict"]["editor.micro_batch_rows"]
    torch.save(ckpt, editor_dir / "older.ckpt")
    assert export_main(["--ckpt_path", str(editor_dir / "older.ckpt"), "--out", str(editor_dir / "older")]) == 0
    assert int(load_editor(editor_dir / "older")[0].micro_batch_rows) == 4
    again = editor_dir / "editor2"
    assert export_main(["--ckpt_path", str(editor_dir / "ckpt" / "last.ckpt"), "--out", str(again)]) == 0
    for name in ("config.json", "model.safetensors"):
        assert _sha(again / name) == _sha(editor_dir / "editor" / name)
    # an existing --out is never overwritten without --overwrite
    assert export_main(["--ckpt_path", str(editor_dir / "ckpt" / "last.ckpt"), "--out", str(again)]) == 2
    assert "already exists" in capsys.readouterr().err


def _requests_file(tmp_path, n=6):
    records = json.loads(__import__("gzip").open(ZSRE_EVAL).read())[:n]
    path = tmp_path / "requests.json"
    path.write_text(json.dumps(records))
    return path


def test_edit_saves_a_model_that_plain_transformers_reloads(editor_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    requests_path = _requests_file(tmp_path)
    ke = KnowledgeEditor.from_pretrained(editor_dir / "editor")
    requests, _ = load_requests(requests_path)
    shifts, report = ke.edit(requests, max_length=1024)
    assert report["n_requests"] == 6 and set(report["summary"]) == {"before", "after"}
    assert {"ES", "GS", "LS", "LS_agree"} <= set(report["summary"]["after"])
    ke.save(tmp_path / "edited")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, ke.model(ids).logits, rtol=0, atol=0)
    # the in-memory edit equals the functional (hooked) application of the same shifts
    base, _ = load_model(ke.model_name)
    from horse_pl.edit_modules import get_modules
    from horse_pl.editing.shifts import applied

    with torch.no_grad(), applied(get_modules(base, ke.config.edit_modules), shifts):
        torch.testing.assert_close(base(ids).logits, ke.model(ids).logits, rtol=1e-5, atol=1e-5)


def test_edit_cli_delta_apply_revert_and_stack(editor_dir, tiny_llama, tmp_path, capsys):
    requests_path = _requests_file(tmp_path)
    common = ["--editor", str(editor_dir / "editor"), "--requests", str(requests_path), "--max-length", "1024"]
    assert edit_main(common + ["--out", str(tmp_path / "full")]) == 0
    assert "ES" in capsys.readouterr().out
    report = json.loads((tmp_path / "full" / "edit_report.json").read_text())
    assert len(report["requests"]) == 6 and "after" in report["requests"][0]
    assert edit_main(common + ["--out", str(tmp_path / "full")]) == 2  # no overwrite without asking
    assert "already exists" in capsys.readouterr().err

    delta = tmp_path / "d1.safetensors"
    assert edit_main(common + ["--delta", "--out", str(delta)]) == 0
    assert edit_main(["apply-delta", "--model", tiny_llama, "--delta", str(delta), "--out", str(tmp_path / "m1")]) == 0
    full, _ = load_model(str(tmp_path / "full"))
    via_delta, _ = load_model(str(tmp_path / "m1"))
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(via_delta(ids).logits, full(ids).logits, rtol=0, atol=0)

    # a second delta made on top of the first, then both reverted in reverse order
    (tmp_path / "x").mkdir()
    second = _requests_file(tmp_path / "x", n=3)
    delta2 = tmp_path / "d2.safetensors"
    assert edit_main(["--editor", str(editor_dir / "editor"), "--requests", str(second), "--max-length", "1024",
                      "--model", str(tmp_path / "m1"), "--delta", "--out", str(delta2)]) == 2  # editor refuses m1
    assert "was trained on" in capsys.readouterr().err
    model, _ = load_model(str(tmp_path / "m1"))
    with pytest.raises(Exception, match="apply deltas in order"):
        apply_delta(model, delta)  # already applied: its base fingerprint no longer matches
    apply_delta(model, delta, sign=-1.0)
    base, _ = load_model(tiny_llama)
    for (name, a), b in zip(model.state_dict().items(), base.state_dict().values()):
        assert torch.equal(a, b), name  # bit for bit, not within float rounding
    apply_delta(model, delta)  # the restored model is the base again: the delta applies once more
    assert edit_main(["revert-delta", "--model", str(tmp_path / "m1"), "--delta", str(delta),
                      "--out", str(tmp_path / "restored")]) == 0
    restored, _ = load_model(str(tmp_path / "restored"))
    for (name, a), b in zip(restored.state_dict().items(), base.state_dict().values()):
        assert torch.equal(a, b), name
    assert oct((delta.stat().st_mode) & 0o777) != oct(0o600)  # readable like any other output file
    # a revert that is not exact leaves a model that is not the base: a delta refuses it
    nudged, _ = load_model(tiny_llama)
    from horse_pl.edit_modules import get_modules, weight_in_out

    with torch.no_grad():
        weight_in_out(get_modules(nudged, ke_modules(editor_dir))[0])[0, 0] += 1e-7
    with pytest.raises(Exception, match="weights differ"):
        apply_delta(nudged, delta)


def ke_modules(editor_dir):
    return load_editor(editor_dir / "editor")[1].edit_modules


def test_revert_is_bit_exact_on_the_embedded_model():
    """Subtracting a merged fp32 shift does not give the weights back (rounding); the delta's restore entries do."""
    from horse_pl.edit_modules import get_modules, resolve_edit_modules, weight_in_out
    from horse_pl.editing.shifts import merge, restore_entries, revert_exactly

    model, _ = load_model("embedded:smollm2-135m")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = get_modules(model, resolve_edit_modules(model, "last:6"))
    torch.manual_seed(0)
    shifts = [torch.randn(weight_in_out(m).shape) * 3e-3 for m in modules]
    originals = [weight_in_out(m).detach().clone() for m in modules]
    merge(modules, shifts)
    restores = [restore_entries(o, weight_in_out(m).detach(), s) for o, m, s in zip(originals, modules, shifts)]
    assert all(len(index) > 0 for index, _ in restores)  # plain subtraction would miss these entries
    revert_exactly(modules, shifts, restores)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_bad_requests_file_and_missing_editor(editor_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"prompt": "x", "target": ""}]')
    editor = str(editor_dir / "editor")
    assert edit_main(["--editor", editor, "--requests", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "record 0: field 'target' is empty" in err and "Traceback" not in err
    good = _requests_file(tmp_path)
    assert edit_main(["--editor", str(tmp_path), "--requests", str(good), "--out", str(tmp_path / "o")]) == 2
    assert "is not an exported editor" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_exported_editor_and_edited_model_explain_themselves(editor_dir, tiny_llama, tmp_path, capsys):
    from conftest import train_args

    from horse_pl.cards import SCORE_ORDER
    from horse_pl.cli import cli

    # a run that validates, with the best-by-val/ES checkpoint of the recipes: its card shows that validation
    ckpt = tmp_path / "ckpt"
    cli(["fit"] + train_args(tiny_llama, tmp_path / "run", steps=2)
        + ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.dirpath", str(ckpt),
           "--trainer.callbacks.monitor", "val/ES", "--trainer.callbacks.mode", "max",
           "--trainer.callbacks.filename", "best-{step}"])
    best = ckpt / "best-step=2.ckpt"
    saved = torch.load(best, weights_only=True)["horse_pl"]
    assert export_main(["--ckpt_path", str(best), "--out", str(tmp_path / "editor")]) == 0
    card = (tmp_path / "editor" / "README.md").read_text()
    config = json.loads((tmp_path / "editor" / "config.json").read_text())
    assert tiny_llama in card and config["base_fingerprint"] in card and "horse" in card
    assert config["training"]["train_sha256"][:16] in card and "2 steps x 8 edits" in card
    validation = config["training"]["validation"]
    assert validation["split"] == "eval" and validation["metrics"] == saved.get("validation", {}).get("metrics")
    assert f"| ES | {validation['metrics']['val/unedited_ES']:.3f} | {validation['metrics']['val/ES']:.3f} |" in card
    # the editor without validation says so, and how to score it
    assert "No validation scores" in (editor_dir / "editor" / "README.md").read_text()

    requests_path = _requests_file(tmp_path, n=4)
    out = tmp_path / "edited"
    assert edit_main(["--editor", str(editor_dir / "editor"), "--requests", str(requests_path), "--max-length", "1024",
                      "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "edit_report.json").read_text())
    examples = report["examples"]
    assert len(examples) == 3 and all(set(e) == {"prompt", "target", "before", "after"} for e in examples)
    # the examples are the greedy continuations of the unedited and the edited model
    from horse_pl.generation import greedy_answers

    base, tokenizer = load_model(tiny_llama)
    edited, _ = load_model(str(out))
    shown, _ = load_requests(requests_path, limit=3)
    assert [e["before"] for e in examples] == greedy_answers(base, tokenizer, shown, max_length=1024)
    # the prompts decode together, left-padded, as each would alone
    assert greedy_answers(base, tokenizer, shown, max_length=1024) == [
        greedy_answers(base, tokenizer, [r], max_length=1024)[0] for r in shown]
    assert [e["after"] for e in examples] == greedy_answers(edited, tokenizer, shown, max_length=1024)
    assert f"after {examples[0]['after']!r}" in printed
    card = (out / "README.md").read_text()
    assert "**4 edits**" in card and report["requests_file"]["sha256"] in card and "from_pretrained" in card
    for name in SCORE_ORDER:
        if name in report["summary"]["after"]:
            before, after = report["summary"]["before"][name], report["summary"]["after"][name]
            assert f"| {name} | {before:.3f} | {after:.3f} |" in card
    assert repr(examples[0]["after"]) in card


def test_score_modes_score_less_and_edit_the_same(editor_dir, tmp_path, capsys):
    requests_path = _requests_file(tmp_path, n=4)
    common = ["--editor", str(editor_dir / "editor"), "--requests", str(requests_path), "--max-length", "1024"]
    for mode in ("all", "edit", "none"):
        assert edit_main(common + ["--score", mode, "--out", str(tmp_path / mode)]) == 0
    out = capsys.readouterr().out
    summaries = {m: json.loads((tmp_path / m / "edit_report.json").read_text())["summary"] for m in ("all", "edit",
                                                                                                    "none")}
    assert {"ES", "GS", "LS", "LS_agree"} <= set(summaries["all"]["after"]) and summaries["all"]["before"]
    assert set(summaries["edit"]["after"]) == {"ES", "GS", "EM_edit", "EM_rephrase"} and not summaries["edit"]["before"]
    assert summaries["edit"]["after"]["ES"] == summaries["all"]["after"]["ES"]
    assert summaries["none"] == {"before": {}, "after": {}} and "not scored (--score none)" in out
    assert not json.loads((tmp_path / "none" / "edit_report.json").read_text())["examples"]  # nothing generated
    # without scores before the edit there are no continuations before it either; those after it are the same
    examples = {m: json.loads((tmp_path / m / "edit_report.json").read_text())["examples"] for m in ("all", "edit")}
    assert [e["before"] for e in examples["edit"]] == [None] * 3 and all(e["before"] for e in examples["all"])
    assert [e["after"] for e in examples["edit"]] == [e["after"] for e in examples["all"]]
    assert "| - |" in (tmp_path / "edit" / "README.md").read_text()
    assert "Not scored" in (tmp_path / "none" / "README.md").read_text()
    models = {m: load_model(str(tmp_path / m))[0].state_dict() for m in ("all", "none")}
    for name, value in models["all"].items():
        assert torch.equal(models["none"][name], value), name


def test_edit_py_can_swap_in_the_joint_solve(editor_dir, tmp_path):
    from horse_pl.editing.update import JointClosedFormUpdate

    requests_path = _requests_file(tmp_path, n=4)
    assert edit_main(["--editor", str(editor_dir / "editor"), "--requests", str(requests_path), "--max-length", "1024",
                      "--update", "joint_closed_form", "--score", "edit", "--out", str(tmp_path / "joint")]) == 0
    assert "update: `joint_closed_form`" in (tmp_path / "joint" / "README.md").read_text()
    editor, config = load_editor(editor_dir / "editor", update="joint_closed_form")
    assert isinstance(editor.update, JointClosedFormUpdate) and config.update == "joint_closed_form"
    assert "form" not in config.update_args  # the per-module solve's option does not carry over


def test_edit_py_refines_the_residuals_when_asked(editor_dir, tmp_path, capsys):
    """--refine K: K Adam steps on the residuals through the editor's own solve; the edit report and the model card
    say so, and the edit differs from the hypernetwork's one step."""
    requests_path = _requests_file(tmp_path, n=4)
    common = ["--editor", str(editor_dir / "editor"), "--requests", str(requests_path), "--max-length", "1024",
              "--score", "edit", "--delta"]
    assert edit_main(common + ["--out", str(tmp_path / "plain.safetensors")]) == 0
    assert edit_main(common + ["--refine", "3", "--refine-lr", "0.5",
                               "--out", str(tmp_path / "refined.safetensors")]) == 0
    from safetensors.torch import load_file

    plain, refined = load_file(tmp_path / "plain.safetensors"), load_file(tmp_path / "refined.safetensors")
    shift_names = [n for n in plain if "restore" not in n]
    assert shift_names and any(not torch.equal(plain[n], refined[n]) for n in shift_names)
    report = json.loads((tmp_path / "refined.safetensors.edit_report.json").read_text())
    assert report["settings"]["refinement"] == {"steps": 3, "lr": 0.5, "target": 1.0, "preserve": 0.0, "at": "all",
                                                "prefixes": 0, "locality": 0.0, "general": 0.0, "paraphrases": 0,
                                                "budget": 0.0}
    assert edit_main(common + ["--refine", "3", "--refine-lr", "0.5", "--refine-at", "keys",
                               "--out", str(tmp_path / "keyed.safetensors")]) == 0
    keyed = load_file(tmp_path / "keyed.safetensors")
    assert any(not torch.equal(keyed[n], refined[n]) for n in shift_names)
    report = json.loads((tmp_path / "keyed.safetensors.edit_report.json").read_text())
    assert report["settings"]["refinement"]["at"] == "keys"
    # a budget on the output change on unrelated text, far below what the refinement moves: another, smaller edit
    assert edit_main(common + ["--refine", "3", "--refine-lr", "0.5", "--refine-budget", "1e-9",
                               "--out", str(tmp_path / "budget.safetensors")]) == 0
    budget = load_file(tmp_path / "budget.safetensors")
    assert (sum(float(budget[n].float().norm()) for n in shift_names)
            < sum(float(refined[n].float().norm()) for n in shift_names))
    report = json.loads((tmp_path / "budget.safetensors.edit_report.json").read_text())
    assert report["settings"]["refinement"]["budget"] == 1e-9
    # behind the model's own context prefixes as well: another edit, said in the report
    assert edit_main(common + ["--refine", "3", "--refine-lr", "0.5", "--refine-prefixes", "2",
                               "--out", str(tmp_path / "prefixed.safetensors")]) == 0
    prefixed = load_file(tmp_path / "prefixed.safetensors")
    assert any(not torch.equal(prefixed[n], refined[n]) for n in shift_names)
    report = json.loads((tmp_path / "prefixed.safetensors.edit_report.json").read_text())
    assert report["settings"]["refinement"]["prefixes"] == 2
    from horse_pl.cards import refinement_text

    assert "2 context prefixes" in refinement_text(report["settings"]["refinement"])
    # keeping unrelated questions' answers (the locality questions of a records file): another edit, said too
    assert edit_main(common + ["--refine", "3", "--refine-lr", "0.5", "--refine-locality", "10",
                               "--refine-locality-data", str(requests_path), "--refine-locality-n", "3",
                               "--out", str(tmp_path / "kept.safetensors")]) == 0
    kept = load_file(tmp_path / "kept.safetensors")
    assert any(not torch.equal(kept[n], refined[n]) for n in shift_names)
    report = json.loads((tmp_path / "kept.safetensors.edit_report.json").read_text())
    assert report["settings"]["refinement"]["locality"] == 10.0
    assert "locality 10" in refinement_text(report["settings"]["refinement"])
    no_questions = tmp_path / "no_questions.json"
    no_questions.write_text(json.dumps([{"prompt": "Who made X?", "target": " Me"}]))
    capsys.readouterr()
    assert edit_main(common + ["--refine", "1", "--refine-locality", "1", "--refine-locality-data", str(no_questions),
                               "--out", str(tmp_path / "never.safetensors")]) == 2
    assert "no_questions.json' holds no records with a locality question" in capsys.readouterr().err
    assert not (tmp_path / "never.safetensors").exists()
    # keeping plain text's next-token distributions (the general data's preservation texts): another edit, said too
    assert edit_main(common + ["--refine", "3", "--refine-lr", "0.5", "--refine-general", "10",
                               "--refine-general-n", "4", "--out", str(tmp_path / "general.safetensors")]) == 0
    general = load_file(tmp_path / "general.safetensors")
    assert any(not torch.equal(general[n], refined[n]) for n in shift_names)
    report = json.loads((tmp_path / "general.safetensors.edit_report.json").read_text())
    assert report["settings"]["refinement"]["general"] == 10.0
    assert "KL 10 on plain text" in refinement_text(report["settings"]["refinement"])
    capsys.readouterr()
    assert edit_main(common + ["--refine", "1", "--refine-general", "1", "--general-data", "none",
                               "--out", str(tmp_path / "never.safetensors")]) == 2
    assert "pass --general-data FOLDER" in capsys.readouterr().err
    assert not (tmp_path / "never.safetensors").exists()
    # the prompts asked in other words, the rephrasings a records file pairs with their question templates
    assert edit_main(common + ["--refine", "3", "--refine-lr", "0.5", "--refine-paraphrases", "2",
                               "--refine-paraphrase-data", str(ZSRE_TRAIN), "--refine-paraphrase-n", "2000",
                               "--out", str(tmp_path / "rephrased.safetensors")]) == 0
    rephrased = load_file(tmp_path / "rephrased.safetensors")
    assert any(not torch.equal(rephrased[n], refined[n]) for n in shift_names)
    report = json.loads((tmp_path / "rephrased.safetensors.edit_report.json").read_text())
    assert report["settings"]["refinement"]["paraphrases"] == 2
    assert "asked in up to 2 other words" in refinement_text(report["settings"]["refinement"])
    capsys.readouterr()
    assert edit_main(common + ["--refine", "1", "--refine-paraphrases", "1", "--refine-paraphrase-data",
                               str(no_questions), "--out", str(tmp_path / "never.safetensors")]) == 2
    assert "no_questions.json' holds no records with a subject named in both" in capsys.readouterr().err
    assert not (tmp_path / "never.safetensors").exists()
    other_questions = tmp_path / "other_questions.json"
    other_questions.write_text(json.dumps([{"prompt": "Who painted Mona Lisa?", "target": " Me", "subject": "Mona Lisa",
                                            "rephrase": "Mona Lisa was painted by whom?"}]))
    assert edit_main(common + ["--refine", "1", "--refine-paraphrases", "1", "--refine-paraphrase-data",
                               str(other_questions), "--out", str(tmp_path / "never.safetensors")]) == 2
    assert "other_questions.json' knows none of these 4 requests' question templates" in capsys.readouterr().err
    assert not (tmp_path / "never.safetensors").exists()


def test_edit_py_shows_each_stage_s_progress_when_asked(editor_dir, tmp_path, capsys):
    """--progress on: one bar per stage on stderr (capture, refinement, scoring, save); off (and auto in CI or
    without a terminal, as here): none."""
    requests_path = _requests_file(tmp_path, n=4)
    common = ["--editor", str(editor_dir / "editor"), "--requests", str(requests_path), "--max-length", "1024",
              "--refine", "2"]
    assert edit_main(common + ["--progress", "on", "--out", str(tmp_path / "shown")]) == 0
    err = capsys.readouterr().err
    for stage in ("capture", "refine", "score before", "score after", "save"):
        assert stage in err, stage
    assert "2/2" in err  # the refinement's two steps
    assert edit_main(common + ["--out", str(tmp_path / "quiet")]) == 0
    err = capsys.readouterr().err
    assert "score after" not in err and "capture" not in err


def test_editing_replays_the_layers_below_the_edit_modules_bit_for_bit(editor_dir, tmp_path, monkeypatch):
    """Capture, refinement and scoring before and after the edit give bit for bit the shifts and scores of full
    passes while the layers below the lowest edit module run once per input (horse_pl.lm.replayed_below)."""
    import horse_pl.api as api
    import horse_pl.editing.evaluate as evaluate
    from horse_pl.editing.editor import Refinement
    from horse_pl.lm import lowest_layer
    from horse_pl.lm.replay import decoder_layers
    from horse_pl.sequential.general import GeneralCheck

    ke = KnowledgeEditor.from_pretrained(editor_dir / "editor")
    requests, _ = load_requests(_requests_file(tmp_path, n=6))
    first = lowest_layer(ke.model, ke.modules)
    assert first > 0  # the tiny editor edits upper layers only
    calls = []
    next(decoder_layers(ke.model)[0].children()).register_forward_hook(lambda *_: calls.append(1))

    def run():
        calls.clear()
        general = GeneralCheck(ke.tokenizer, SHARED / "general", ("open_domain_qa",), 8)
        shifts, report = ke.edit(requests, max_length=1024, merge_shifts=False, examples=0, general=general,
                                 refinement=Refinement(2, 0.5))
        return shifts, report["summary"], report["requests"], report["general"], len(calls)

    shifts, summary, per_request, general, replay_calls = run()
    monkeypatch.setattr(api, "REPLAY_BYTES", 0)  # nothing recorded: every pass runs in full
    monkeypatch.setattr(evaluate, "REPLAY_BYTES", 0)
    full_shifts, full_summary, full_per_request, full_general, full_calls = run()
    assert all(torch.equal(a, b) for a, b in zip(shifts, full_shifts))
    assert summary == full_summary and per_request == full_per_request and general == full_general
    assert general["after"] != general["before"]  # the edit changed what the general check scores
    assert replay_calls < full_calls / 2, (replay_calls, full_calls)


def test_the_refinement_s_texts_come_in_the_caller_s_batch_size(editor_dir, tmp_path):
    """``refinement_batches(batch_size=B)`` batches the general term's texts B at a time, as it does the prompts."""
    from horse_pl.editing.editor import Refinement

    ke = KnowledgeEditor.from_pretrained(editor_dir / "editor")
    requests, _ = load_requests(_requests_file(tmp_path, n=4))
    for size in (3, 8):
        texts = ke.refinement_batches(requests, Refinement(1, general=1.0), n_texts=8, batch_size=size).texts
        assert [int(mb["input_ids"].shape[0]) for mb in texts] == ([3, 3, 2] if size == 3 else [8])
