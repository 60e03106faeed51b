"""Two CPU processes (gloo, Lightning DDP) compute what one process computes on the same global edit batch."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_every_step, train_args

ROOT = Path(__file__).resolve().parents[1]


def _fit(model: str, root: Path, devices: int, method: str, steps: int = 1, extra_args=()) -> tuple[dict, dict]:
    extra = {"trainer.devices": devices, "data.n_edits": 8, "data.batch_size": 2, "data.val_limit": 8,
             "trainer.limit_val_batches": 1, "trainer.strategy": "ddp" if devices > 1 else "auto"}
    args = train_args(model, root, steps=steps, method=method, **extra) + checkpoint_every_step(root / "ckpt")
    args[args.index("--trainer.logger") + 1] = "lightning.pytorch.loggers.CSVLogger"
    args += ["--trainer.logger.save_dir", str(root / "logs"), *extra_args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "train.py", "fit", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    state = torch.load(root / "ckpt" / "last.ckpt", weights_only=False)
    rows = list(csv.DictReader(open(next((root / "logs").rglob("metrics.csv")))))
    metrics = {k: float(v) for row in rows for k, v in row.items() if v and k.startswith("val/")}
    return state, metrics


@pytest.mark.parametrize("method", ["horse", "malmen"])
def test_two_processes_equal_one(tiny_llama, tmp_path, method):
    one, one_metrics = _fit(tiny_llama, tmp_path / "one", 1, method)
    two, two_metrics = _fit(tiny_llama, tmp_path / "two", 2, method)
    editor_one = {k: v for k, v in one["state_dict"].items() if k.startswith("editor.")}
    editor_two = {k: v for k, v in two["state_dict"].items() if k.startswith("editor.")}
    assert set(editor_one) == set(editor_two) and editor_one
    # The same hypernetwork gradient: after one step Adam's first moment is 0.1 x the gradient.
    moments = [[s["exp_avg"] for s in run["optimizer_states"][0]["state"].values()] for run in (one, two)]
    assert moments[0] and len(moments[0]) == len(moments[1])
    for m_one, m_two in zip(*moments):
        torch.testing.assert_close(m_two, m_one, rtol=1e-4, atol=1e-6 * float(m_one.abs().max()) + 1e-12)
    # The updated editor. Adam's first step is about meta_lr * sign(gradient), so float rounding in a
    # near-zero gradient entry can flip it: the blocks' weights agree to 2 x meta_lr; everything else
    # (normaliser statistics, lr, lambda, scale and shift) to float precision.
    meta_lr = one["optimizer_states"][0]["param_groups"][0]["lr"]
    for name in editor_one:
        block_weight = ".blocks." in name and name.rsplit(".", 1)[-1] in ("A", "B", "bias")
        atol = 2 * meta_lr + 1e-7 if block_weight else 1e-7
        torch.testing.assert_close(editor_two[name], editor_one[name], rtol=1e-4, atol=atol, msg=name)
    counts = [v for k, v in editor_one.items() if k.endswith("normalizer.count")]
    assert counts and all(float(c) > 0 for c in counts)
    for name in ("val/ES", "val/GS", "val/LS", "val/LS_agree", "val/unedited_ES", "val/unedited_LS"):
        assert abs(two_metrics[name] - one_metrics[name]) < 1e-5, name
    # the validation shifts come from the updated editor, so equal ES/GS/LS also means equal shifts


def test_ddp_resumes_from_its_checkpoint(tiny_llama, tmp_path):
    """Two processes stopped after 2 steps and resumed to 3 end with the editor of an uninterrupted 3-step run."""
    _fit(tiny_llama, tmp_path / "a", 2, "horse", steps=2)
    resumed, resumed_metrics = _fit(tiny_llama, tmp_path / "b", 2, "horse", steps=3,
                                    extra_args=("--ckpt_path", str(tmp_path / "a" / "ckpt" / "last.ckpt")))
    straight, straight_metrics = _fit(tiny_llama, tmp_path / "s", 2, "horse", steps=3)
    assert resumed["global_step"] == straight["global_step"] == 3
    editor = [k for k in straight["state_dict"] if k.startswith("editor.")]
    assert editor
    for name in editor:
        torch.testing.assert_close(resumed["state_dict"][name], straight["state_dict"][name], rtol=0, atol=1e-7,
                                   msg=name)
    assert resumed_metrics["val/ES"] == pytest.approx(straight_metrics["val/ES"], abs=1e-6)
