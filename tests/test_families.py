"""Every model family in the whole chain on a tiny random configuration: train two steps through train.py, export,
edit through edit.py, reload the edited folder in plain transformers, apply and revert a delta bit for bit, and
edit sequentially with MOSE's OFT adapter. (Default edit modules, capture against autograd and the trimmed and
fused passes against the plain ones are checked per family in test_models.py and test_math.py.)"""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from conftest import CF_EVAL, FAMILIES, ZSRE_EVAL, train_args

from horse_pl.cli import cli
from horse_pl.data.records import load_requests
from horse_pl.edit_modules import resolve_edit_modules
from horse_pl.export import main as export_main
from horse_pl.models import load_model

edit_main = pytest.importorskip("edit").main
NEW = [f for f in FAMILIES if f not in ("llama", "gpt2", "gemma3")]  # the chain of those three: test_edit.py


@pytest.mark.parametrize("kind", NEW)
def test_family_runs_the_whole_chain(kind, tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_models[kind]
    cli(["fit"] + train_args(model_dir, tmp_path / "run", steps=2, **{"trainer.limit_val_batches": 0})
        + ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.dirpath",
           str(tmp_path / "ckpt"), "--trainer.callbacks.save_last", "true"])
    assert export_main(["--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "editor")]) == 0
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps(json.loads(gzip.open(ZSRE_EVAL).read())[:4]))
    common = ["--editor", str(tmp_path / "editor"), "--requests", str(requests), "--max-length", "1024"]
    assert edit_main(common + ["--out", str(tmp_path / "edited")]) == 0
    report = json.loads((tmp_path / "edited" / "edit_report.json").read_text())
    assert {"ES", "GS", "LS", "LS_agree"} <= set(report["summary"]["after"])

    base, tokenizer = load_model(model_dir)
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    names = resolve_edit_modules(base, "last:2")
    changed = {n for n, p in edited.state_dict().items() if not torch.equal(p, base.state_dict()[n])}
    assert changed == {f"{n}.weight" for n in names}  # the edit touched the two edit modules only

    assert edit_main(common + ["--delta", "--out", str(tmp_path / "d.safetensors")]) == 0
    assert edit_main(["apply-delta", "--model", model_dir, "--delta", str(tmp_path / "d.safetensors"),
                      "--out", str(tmp_path / "applied")]) == 0
    assert edit_main(["revert-delta", "--model", str(tmp_path / "applied"), "--delta", str(tmp_path / "d.safetensors"),
                      "--out", str(tmp_path / "restored")]) == 0
    applied, _ = load_model(str(tmp_path / "applied"))
    restored, _ = load_model(str(tmp_path / "restored"))
    for name, value in base.state_dict().items():
        assert torch.equal(applied.state_dict()[name], edited.state_dict()[name]), name
        assert torch.equal(restored.state_dict()[name], value), name

    from horse_pl.data.batch import edit_batch
    from horse_pl.sequential.editors import MoseEditor

    mose = MoseEditor(base, names, n_blocks=4, steps=3, lr=5e-2, radius_scale=1e-2)
    cf, _ = load_requests(CF_EVAL, limit=1)
    mose.edit(edit_batch(tokenizer, cf[:1], ("edit",), 8, 128)["edit"].micro_batches)
    for w, w0 in zip(mose.weights(), mose.original):
        assert not torch.equal(w, w0)
        s0, s1 = torch.linalg.svdvals(w0.double()), torch.linalg.svdvals(w.double())
        assert ((s1 - s0).abs() / s0).max() < 1e-5  # an orthogonal edit keeps the spectrum
