"""Two CPU processes (gloo) compute exactly what one process computes on the same global edit batch."""

import pytest
import torch
from test_training import _args

from horse_pl.cli import cli


def _one_step(model: str, root, devices: int, method: str):
    extra = {"trainer.devices": devices, "data.n_edits": 8, "data.batch_size": 2, "data.val_limit": 8,
             "trainer.limit_val_batches": 1}
    if devices > 1:
        extra["trainer.strategy"] = "ddp_spawn"
    run = cli(["fit"] + _args(model, root, steps=1, method=method, **extra))
    return run.model, {k: float(v) for k, v in run.trainer.callback_metrics.items()}


@pytest.mark.parametrize("method", ["horse", "malmen"])
def test_two_processes_equal_one(tiny_llama, tmp_path, method):
    single, single_metrics = _one_step(tiny_llama, tmp_path / "one", 1, method)
    double, double_metrics = _one_step(tiny_llama, tmp_path / "two", 2, method)
    one, two = single.editor.state_dict(), double.editor.state_dict()
    assert set(one) == set(two)
    for name in one:  # hypernetwork parameters after the update and normaliser statistics
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-7, msg=name)
    assert any("normalizer.count" in n and float(one[n]) > 0 for n in one)
    assert float(next(v for n, v in one.items() if n.endswith("normalizer.count"))) == float(
        next(v for n, v in two.items() if n.endswith("normalizer.count")))
    for name in ("val/ES", "val/GS", "val/LS", "val/LS_agree", "val/unedited_ES"):
        assert abs(double_metrics[name] - single_metrics[name]) < 1e-5, name
