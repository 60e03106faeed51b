"""Nothing is lost: pre-emption saves last.ckpt, an interrupted --overwrite leaves an output whole, benchmarks write
only their own folders; and what users feed in is read the way they mean it (KnowEdit zsRE, conflicting requests)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ZSRE_EVAL, train_args
from lightning.pytorch import Callback

from horse_pl import io
from horse_pl.cli import cli
from horse_pl.data.records import detect_format, find_conflicts, load_requests

edit_main = pytest.importorskip("edit").main


class _SigtermAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args, **kwargs):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_last_and_the_run_resumes_exactly(tiny_llama, tmp_path, capsys):
    no_val = {"trainer.limit_val_batches": 0}
    # a checkpoint callback that would only save at step 100: without the SIGTERM save there is no last.ckpt
    rare = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.dirpath",
            str(tmp_path / "ckpt"), "--trainer.callbacks.save_last", "true",
            "--trainer.callbacks.every_n_train_steps", "100"]
    straight = cli(["fit"] + train_args(tiny_llama, tmp_path / "s", steps=4, **no_val))
    run = cli(train_args(tiny_llama, tmp_path / "a", steps=4, **no_val) + rare, run=False)
    run.trainer.callbacks.append(_SigtermAt(2))
    with pytest.raises(SystemExit):
        run.trainer.fit(run.model, run.datamodule)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert f"saved {last} at step 2" in capsys.readouterr().err
    resumed = cli(["fit"] + train_args(tiny_llama, tmp_path / "b", steps=4, **no_val) + ["--ckpt_path", str(last)])
    assert resumed.trainer.global_step == 4
    for name, value in straight.model.editor.state_dict().items():
        assert torch.equal(resumed.model.editor.state_dict()[name], value), name


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_an_interrupted_overwrite_leaves_the_old_output_and_the_next_write_cleans_up(tmp_path, capsys):
    target = tmp_path / "out"

    def private(folder):  # safetensors writes its files 0600
        (folder / "v").write_text("1")
        os.chmod(folder / "v", 0o600)

    io.write_atomic_dir(target, private)
    assert (target / "v").stat().st_mode & 0o777 == 0o666 & ~io._umask()
    io.write_atomic_dir(target, lambda f: (f / "v").write_text("2"), "replace")
    assert (target / "v").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["out"]
    # a run killed between moving the old output aside and moving the new one in (the fallback without an atomic
    # exchange), and another killed while writing: the next write to the same target restores, then cleans up
    pid = _dead_pid()
    aside = tmp_path / f".out-old-{pid}-x1"
    aside.mkdir()
    os.replace(target, aside / "out")
    half = tmp_path / f".out-{pid}-x2"
    half.mkdir()
    (half / "partial").write_bytes(b"0" * 1000)
    io.recover_leftovers(target)
    assert (target / "v").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["out"]
    err = capsys.readouterr().err
    assert f"restored '{target}'" in err and str(half) in err and "interrupted" in err


def test_overwrite_swaps_in_one_step_or_keeps_the_old_output_on_a_crash(tmp_path, monkeypatch):
    target = tmp_path / "out"
    io.write_atomic_dir(target, lambda f: (f / "v").write_text("old"))

    def crash(folder):
        (folder / "v").write_text("new, half written")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.write_atomic_dir(target, crash, "replace")
    assert (target / "v").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out"]
    if io._exchange(target, target):  # Linux: renameat2(RENAME_EXCHANGE) is used, target never missing
        monkeypatch.setattr(io.os, "replace", lambda *a: pytest.fail("exchange expected, not a rename"))
        io.write_atomic_dir(target, lambda f: (f / "v").write_text("new"), "replace")
        assert (target / "v").read_text() == "new"


def test_check_writable_refuses_a_read_only_folder_and_a_full_disk(tmp_path, monkeypatch):
    io.check_writable(tmp_path / "out", needed_bytes=1)
    monkeypatch.setattr(io.os, "access", lambda *a: False)
    with pytest.raises(io.OutputError, match="is not writable; choose another --out"):
        io.check_writable(tmp_path / "out")
    monkeypatch.undo()
    monkeypatch.setattr(io.shutil, "disk_usage", lambda p: type("U", (), {"free": 10})())
    with pytest.raises(io.OutputError, match="MiB free"):
        io.check_writable(tmp_path / "out", needed_bytes=2**30)


KNOWEDIT_ZSRE = {
    "subject": "Watts Humphrey", "prompt": "What university did Watts Humphrey attend?",
    "target_new": "University of Michigan", "ground_truth": ["Illinois Institute of Technology"],
    "rephrase_prompt": "What university did Watts Humphrey take part in?",
    "locality": {"Relation_Specificity": [{"prompt": "nq question: who played desmond doss father in hacksaw ridge",
                                           "ground_truth": ["Hugo Weaving"]}]},
    "portability": {"Reasoning": [{"prompt": "What is the mascot of the university Watts Humphrey attended?",
                                   "ground_truth": [["Wolverine"]]}],
                    "Subject_Aliasing": [], "Logical_Generalization": []},
}
LAYOUTS = {  # one record of each layout the README names, and the reader that must take it
    "zsre": json.loads(gzip.open(ZSRE_EVAL).read())[0],
    "counterfact": {"prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
                    "ground_truth": "French", "rephrase_prompt": "Danielle Darrieux's mother tongue is",
                    "locality_prompt": "The mother tongue of Léon Blum is", "locality_ground_truth": "French",
                    "subject": "Danielle Darrieux"},
    "counterfact_rome": {"requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                               "target_new": {"str": "English"}, "target_true": {"str": "French"}},
                         "paraphrase_prompts": ["Danielle Darrieux's mother tongue is"],
                         "neighborhood_prompts": ["The mother tongue of Léon Blum is"]},
    "knowedit_zsre": KNOWEDIT_ZSRE,
    "knowedit_wikibio": {"text": "This is a Wikipedia passage about rick mahler.", "labels": "He was drafted.",
                         "concept": "rick mahler",
                         "locality": {"Relation_Specificity": [{"prompt": "The cause of death of rick mahler is",
                                                                "ground_truth": ["heart attack"]}]}},
    "requests": {"prompt": "The capital of Freedonia is", "target": "Sylvania"},
}
READER = {"zsre": "zsre", "counterfact": "counterfact", "counterfact_rome": "counterfact",
          "knowedit_zsre": "knowedit", "knowedit_wikibio": "knowedit", "requests": "requests"}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_is_detected_by_its_whole_shape(layout, tmp_path):
    assert detect_format([LAYOUTS[layout]]) == READER[layout]
    path = tmp_path / "r.json"
    path.write_text(json.dumps([LAYOUTS[layout]]))
    (request,), report = load_requests(path)
    assert report.format == READER[layout] and request.prompt and request.target


@pytest.mark.parametrize("name", ["wiki_counterfact_test_cf", "wiki_counterfact_train_cf", "wiki_recent_recent_train",
                                  "wikibio-test-all", "wikibio-train-all"])
def test_the_shared_knowedit_files_still_load_as_knowedit(name):
    from conftest import KNOWEDIT

    requests, report = load_requests(KNOWEDIT / f"{name}.json.gz", skip_invalid=True)
    assert report.format == "knowedit" and len(requests) > 0.9 * report.n_records
    assert sum(r.locality_prompt is not None for r in requests) > 0.7 * len(requests)  # wiki_recent: 73 %
    if name == "wiki_counterfact_test_cf":  # the one with rephrases
        assert all(r.rephrase for r in requests[:20])


def test_knowedit_zsre_keeps_its_rephrase_locality_and_portability(tmp_path):
    path = tmp_path / "zsre_knowedit.json"
    path.write_text(json.dumps([KNOWEDIT_ZSRE]))
    (request,), _ = load_requests(path)
    assert request.rephrase == KNOWEDIT_ZSRE["rephrase_prompt"]
    assert request.locality_answer == "Hugo Weaving" and request.locality_prompt.startswith("nq question")
    assert request.portability_answer == "Wolverine" and request.ground_truth == "Illinois Institute of Technology"


def test_conflicting_requests_are_named_by_edit_py_and_inspect(editor_dir, tmp_path, capsys):
    from horse_pl.data.__main__ import inspect

    records = [{"prompt": "The capital of Freedonia is", "target": t} for t in ("Sylvania", "Marxburg", "Sylvania")]
    records.append({"prompt": "The river of Freedonia is", "target": "Groucho"})
    path = tmp_path / "r.json"
    path.write_text(json.dumps(records))
    requests, _ = load_requests(path)
    assert find_conflicts(requests) == (1, {"The capital of Freedonia is": ["Sylvania", "Marxburg"]})
    report = inspect(str(path), "auto", _model(editor_dir), 256)
    assert "duplicates (same prompt and target): 1" in report and "conflicts" in report and "Marxburg" in report
    assert edit_main(["--editor", str(editor_dir / "editor"), "--requests", str(path), "--max-length", "1024",
                      "--out", str(tmp_path / "edited")]) == 0
    err = capsys.readouterr().err
    assert "1 prompts have requests with different targets" in err and "at most one target" in err


def _model(editor_dir) -> str:
    return json.loads((editor_dir / "editor" / "config.json").read_text())["base_model"]


def test_the_step_benchmark_writes_nothing_into_the_recipe_folder(tiny_llama, tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("train_step", root / "benchmarks" / "train_step.py")
    train_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_step)
    run_folder = tmp_path / "user_run"
    run_folder.mkdir()
    (run_folder / "config.yaml").write_text("the user's run config\n")
    config = tmp_path / "recipe.yaml"
    config.write_text(f"trainer:\n  default_root_dir: {run_folder}\n")
    extra = train_args(tiny_llama, tmp_path / "ignored", steps=1)
    extra = extra[:extra.index("--trainer.default_root_dir")] + extra[extra.index("--trainer.default_root_dir") + 2:]
    train_step.run(str(config), steps=1, warmup=0, extra=extra)
    assert sorted(p.name for p in run_folder.iterdir()) == ["config.yaml"]
    assert (run_folder / "config.yaml").read_text() == "the user's run config\n"
