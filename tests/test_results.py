"""Result records: a run writes its own JSON record, and the published documents are generated from records."""

import importlib.util
import json
from pathlib import Path

from conftest import train_args

from horse_pl.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def _make_results():
    spec = importlib.util.spec_from_file_location("make_results", ROOT / "scripts" / "make_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_results_documents_are_up_to_date_with_the_records():
    # fails when a record in docs/results/ changed and `python scripts/make_results.py` was not run
    assert _make_results().main(["--check"]) == 0


def test_results_document_is_built_from_the_records_only(tmp_path, monkeypatch):
    make = _make_results()
    records = make.load_records()
    assert records and all("command" in r and "date" in r for r in records.values())
    text = make.results_md(records)
    for name, record in records.items():
        if record.get("kind") in ("fit", "validate"):
            assert f"`{name}`" in text and f"{record['metrics']['val/ES']:.3f}" in text
    # another record changes the document: nothing is typed in
    changed = {**records, "x_fit": {**records["horse_smollm2_zsre"], "metrics": {"val/ES": 0.1234}}}
    assert make.results_md(changed).count("0.123") == text.count("0.123") + 1
    # a scale record's output change (the refinement budget's measure) gets its column where a run recorded it
    budget = records["edit_quality_zsre_eval_answer_refine_budget_1024"]
    change = next(iter(budget["editors"].values()))["1024"]["output_change"]
    assert "output change" in text and f"{change:.2e}" in text


def test_recorder_writes_fit_and_validate_records(tiny_llama, tmp_path):
    root = tmp_path / "run"
    recorder = ["--trainer.callbacks+", "horse_pl.records.ResultsRecorder",
                "--trainer.callbacks.recipe", "configs/quickstart.yaml", "--trainer.callbacks.name", "tiny"]
    ckpt = ["--trainer.callbacks+", "lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.dirpath",
            str(root / "ckpt"), "--trainer.callbacks.save_last", "true"]
    cli(["fit"] + train_args(tiny_llama, root, steps=2) + recorder + ckpt)
    cli(["validate"] + train_args(tiny_llama, root, steps=2) + recorder
        + ["--ckpt_path", str(root / "ckpt" / "last.ckpt")])
    paths = sorted(root.glob("tiny-*.json"))
    kinds = {json.loads(p.read_text())["kind"]: json.loads(p.read_text()) for p in paths}
    assert set(kinds) == {"fit", "validate"}
    fit = kinds["fit"]
    assert fit["recipe"] == "configs/quickstart.yaml" and fit["global_step"] == 2 and fit["machine"]
    assert {"val/ES", "val/GS", "val/LS", "val/unedited_ES"} <= set(fit["metrics"])
    assert fit["step_seconds"]["step"]["n"] == 2 and fit["step_seconds"]["capture"]["mean"] > 0
    assert fit["hyperparameters"]["rank"] == 8 and fit["data"]["n_edits"] == 8
    assert kinds["validate"]["metrics"]["val/ES"] == fit["metrics"]["val/ES"]  # the same editor, scored again
