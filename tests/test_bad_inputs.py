"""A table of bad inputs through the real entry points (edit.py, train.py fit/export, inspect): every row ends
with exit code 2 and one line on stderr that names the file, field or argument, without a traceback, and leaves
a pre-existing output as it was."""

from __future__ import annotations

import gzip
import json
import pickle
import shutil
from pathlib import Path

import pytest
from conftest import ZSRE_EVAL, checkpoint_every_step, train_args

from horse_pl.cli import main as train_main
from horse_pl.data.__main__ import main as inspect_main
from horse_pl.export import main as export_main

edit_main = pytest.importorskip("edit").main


def _damaged_editor(src: Path, dst: Path, change) -> str:
    shutil.copytree(src, dst)
    change(dst)
    return str(dst)


def _config_edit(**fields):
    def change(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        for key, value in fields.items():
            if value is ...:
                config.pop(key)
            else:
                config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
    return change


def _pickle_file(path: Path) -> Path:
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    return path


def _truncated(src: Path, dst: Path, keep: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


@pytest.fixture(scope="module")
def inputs(editor_dir, tiny_llama, tiny_models, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad")
    editor = editor_dir / "editor"
    records = json.loads(gzip.open(ZSRE_EVAL).read())[:4]
    good = root / "requests.json"
    good.write_text(json.dumps(records))
    corrupt_gz = root / "requests.json.gz"
    corrupt_gz.write_bytes(gzip.compress(json.dumps(records).encode())[:40])
    (root / "requests_folder").mkdir()
    a_file = root / "a_file"
    a_file.write_text("x")
    existing = root / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("the user's output")
    delta = root / "d.safetensors"
    assert edit_main(["--editor", str(editor), "--requests", str(good), "--max-length", "1024", "--delta",
                      "--out", str(delta)]) == 0
    ckpt = editor_dir / "ckpt" / "last.ckpt"
    return {
        "root": root, "editor": str(editor), "good": str(good), "existing": str(existing), "model": tiny_llama,
        "other_model": tiny_models["gpt2"], "ckpt": str(ckpt), "delta": str(delta),
        "corrupt_gz": str(corrupt_gz), "folder": str(root / "requests_folder"), "a_file": str(a_file),
        "truncated_weights": _damaged_editor(editor, root / "e1", lambda f: _truncated(
            f / "model.safetensors", f / "model.safetensors", 0.3)),
        "pickle_weights": _damaged_editor(editor, root / "e2", lambda f: _pickle_file(f / "model.safetensors")),
        "missing_field": _damaged_editor(editor, root / "e3", _config_edit(rank=...)),
        "extra_field": _damaged_editor(editor, root / "e4", _config_edit(colour="blue")),
        "mistyped_field": _damaged_editor(editor, root / "e5", _config_edit(rank="eight")),
        "list_config": _damaged_editor(editor, root / "e6", lambda f: (f / "config.json").write_text("[1, 2]")),
        "wrong_shapes": _damaged_editor(editor, root / "e7", _config_edit(rank=5)),
        "truncated_ckpt": str(_truncated(ckpt, root / "truncated.ckpt")),
        "pickle_ckpt": str(_pickle_file(root / "pickle.ckpt")),
        "pickle_delta": str(_pickle_file(root / "pickle.safetensors")),
        "binary_requests": str(_pickle_file(root / "requests.bin.json")),
        "pickle_model": _damaged_editor(Path(tiny_llama), root / "m1", lambda f: _pickle_file(f / "model.safetensors")),
    }


def _edit(editor_key: str = "editor", requests_key: str = "good", *extra: str):
    return lambda i: ["--editor", i[editor_key], "--requests", i[requests_key], "--max-length", "1024",
                      "--out", i["existing"], "--overwrite", *extra]


def _fit(i, *extra):
    return ["fit"] + train_args(i["model"], i["root"] / "fit", steps=2) + list(extra)


# (id, entry point, arguments from the inputs, words the one-line message must contain)
CASES = [
    ("corrupt-gz", "edit", _edit("editor", "corrupt_gz"), ["requests.json.gz", "gzip"]),
    ("requests-folder", "edit", _edit("editor", "folder"), ["requests_folder", "is a folder"]),
    ("binary-requests", "edit", _edit("editor", "binary_requests"), ["requests.bin.json", "UTF-8"]),
    ("limit-negative", "edit", lambda i: _edit()(i) + ["--limit", "-1"], ["limit=-1"]),
    ("rounds-zero", "edit", lambda i: _edit()(i) + ["--rounds", "0"], ["--rounds", "at least 1"]),
    ("refine-negative", "edit", lambda i: _edit()(i) + ["--refine", "-1"], ["--refine", "at least 0"]),
    ("refine-lr-zero", "edit", lambda i: _edit()(i) + ["--refine", "2", "--refine-lr", "0"],
     ["--refine-lr", "above 0"]),
    ("refine-target-above-1", "edit", lambda i: _edit()(i) + ["--refine", "2", "--refine-target", "1.5"],
     ["--refine-target", "probability"]),
    ("refine-budget-negative", "edit", lambda i: _edit()(i) + ["--refine", "2", "--refine-budget", "-0.5"],
     ["--refine-budget", "at least 0"]),
    ("truncated-weights", "edit", _edit("truncated_weights"), ["e1/model.safetensors", "safetensors"]),
    ("pickle-weights", "edit", _edit("pickle_weights"), ["e2/model.safetensors", "safetensors"]),
    ("missing-field", "edit", _edit("missing_field"), ["e3/config.json", "missing ['rank']"]),
    ("extra-field", "edit", _edit("extra_field"), ["e4/config.json", "unknown ['colour']"]),
    ("mistyped-field", "edit", _edit("mistyped_field"), ["e5/config.json", "field 'rank'"]),
    ("list-config", "edit", _edit("list_config"), ["e6/config.json", "JSON list"]),
    ("wrong-shapes", "edit", _edit("wrong_shapes"), ["e7/model.safetensors", "does not fit"]),
    ("out-under-a-file", "edit", lambda i: _edit()(i)[:-3] + ["--out", i["a_file"] + "/model"],
     ["a_file", "is not a folder"]),
    ("delta-out-is-folder", "edit", _edit("editor", "good", "--delta"), ["existing", "is a folder"]),
    ("apply-missing-delta", "edit", lambda i: ["apply-delta", "--model", "no/such-model", "--delta",
                                               str(i["root"] / "missing.safetensors"), "--out", i["existing"],
                                               "--overwrite"], ["missing.safetensors", "does not exist"]),
    ("apply-pickle-delta", "edit", lambda i: ["apply-delta", "--model", i["model"], "--delta", i["pickle_delta"],
                                              "--out", i["existing"], "--overwrite"],
     ["pickle.safetensors", "safetensors"]),
    ("apply-delta-folder", "edit", lambda i: ["apply-delta", "--model", i["model"], "--delta", i["folder"],
                                              "--out", i["existing"], "--overwrite"], ["requests_folder", "folder"]),
    ("pickle-model-weights", "edit", lambda i: ["apply-delta", "--model", i["pickle_model"], "--delta", i["delta"],
                                                "--out", i["existing"], "--overwrite"], ["m1", "cannot be loaded"]),
    ("edit-without-editor", "edit", lambda i: ["edit", "--requests", i["good"], "--out", i["existing"],
                                                "--overwrite"], ["--editor", "required", "edit --help"]),
    ("revert-without-delta", "edit", lambda i: ["revert-delta", "--model", i["model"], "--out", i["existing"],
                                                "--overwrite"], ["--delta", "required", "revert-delta --help"]),
    ("unknown-command-option", "edit", lambda i: _edit()(i) + ["--turn-size", "2"], ["--turn-size"]),
    ("offline-hub-model", "train", lambda i: ["fit"] + train_args("nobody/no-such-model", i["root"] / "fit", steps=2),
     ["nobody/no-such-model", "cannot be loaded"]),
    ("resume-truncated-ckpt", "train", lambda i: _fit(i, "--ckpt_path", i["truncated_ckpt"]),
     ["truncated.ckpt", "cannot be read"]),
    ("resume-other-model", "train", lambda i: _fit(i, "--ckpt_path", i["ckpt"], "--model.model", i["other_model"]),
     ["last.ckpt", "llama", "gpt2"]),
    ("export-truncated-ckpt", "export", lambda i: ["--ckpt_path", i["truncated_ckpt"], "--out", i["existing"],
                                                   "--overwrite"], ["truncated.ckpt", "cannot be read"]),
    ("export-pickle-ckpt", "export", lambda i: ["--ckpt_path", i["pickle_ckpt"], "--out", i["existing"],
                                                "--overwrite"], ["pickle.ckpt", "cannot be read"]),
    ("inspect-corrupt-gz", "inspect", lambda i: ["inspect", "--path", i["corrupt_gz"], "--model", i["model"]],
     ["requests.json.gz", "gzip"]),
    ("inspect-offline-hub-id", "inspect", lambda i: ["inspect", "--path", "nobody/no-such-dataset", "--model",
                                                     i["model"]], ["nobody/no-such-dataset", "Hugging Face"]),
]


def _run(entry: str, argv: list[str]) -> int:
    if entry == "edit":
        return edit_main(argv)
    if entry == "export":
        return export_main(argv)
    if entry == "inspect":
        return inspect_main(argv)
    try:
        train_main(argv)
    except SystemExit as exit_:
        return exit_.code
    return 0


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_sentence_and_changes_nothing(case, inputs, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _, entry, make_args, words = case
    existing = Path(inputs["existing"])
    assert _run(entry, [str(a) for a in make_args(inputs)]) == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"]
    assert (existing / "keep.txt").read_text() == "the user's output"


def test_resume_onto_the_same_model_is_still_accepted(inputs, tmp_path):
    """The refusal above is about the model: resuming with the checkpoint's own model trains on."""
    ckpt = tmp_path / "ckpt"
    train_main(["fit"] + train_args(inputs["model"], tmp_path / "a", steps=1, **{"trainer.limit_val_batches": 0})
               + checkpoint_every_step(ckpt))
    train_main(["fit"] + train_args(inputs["model"], tmp_path / "b", steps=2, **{"trainer.limit_val_batches": 0})
               + ["--ckpt_path", str(ckpt / "last.ckpt")])
