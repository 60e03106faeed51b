"""Meta-training step time of a recipe, beside the work it does and this machine's matrix-product rate.

    python benchmarks/train_step.py                                   # the zsRE benchmark recipe, 12 steps
    python benchmarks/train_step.py --config configs/quickstart.yaml --steps 6
    python benchmarks/train_step.py --steps 4 -- --model.rank 64      # anything after -- goes to the recipe

Runs the recipe's own training loop (``train.py fit``'s model, data and trainer, without validation,
logger or checkpoints) for ``--warmup + --steps`` edit batches and reports each timed step's split as
the module logs it (``time/capture``, ``normalizer``, ``predict``, ``spread``, ``solve``, ``losses``,
``backward``, ``optimizer``: :data:`horse_pl.timing.TRAIN_STAGES`; mean and median), the
floating-point work of one step (counted by ``torch.utils.flop_counter`` on the first warm-up step,
which is not timed), and this machine's matrix-product rate on the model's layer shapes (on the language
model's device, in its dtype), measured before and after. Shared machines change speed by more than a few
percent from hour to hour; the work per step and the rate let a step time be read against the machine it was
taken on. Writes a JSON file.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from common import provenance, split_at_dashes, write_json  # noqa: E402

from horse_pl.arguments import positive_int  # noqa: E402
from horse_pl.timing import TRAIN_STAGES  # noqa: E402

STAGES = TRAIN_STAGES + ("step",)  # step: their sum



def matmul_rate(d_model: int, d_ff: int, tokens: int = 512, seconds: float = 1.0, device="cpu",
                dtype=None) -> float:
    """GFLOP/s of this machine on a decoder layer's matrix products (``tokens`` rows), on the language model's
    device and in its dtype."""
    import torch

    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    torch.manual_seed(0)
    shapes = [(d_model, d_ff), (d_ff, d_model), (d_model, d_model)]
    xs = [torch.randn(tokens, i, device=device, dtype=dtype) for i, _ in shapes]
    ws = [torch.randn(i, o, device=device, dtype=dtype) for i, o in shapes]
    flop_per_round = sum(2 * tokens * i * o for i, o in shapes)
    for x, w in zip(xs, ws):  # warm up
        x @ w
    sync()
    rounds, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for x, w in zip(xs, ws):
            x @ w
        rounds += 1
    sync()
    return rounds * flop_per_round / (time.perf_counter() - start) / 1e9


def _recorder(warmup: int):
    """A Lightning callback recording the logged ``time/*`` of each step after ``warmup`` and counting the
    floating-point operations of the first step."""
    from lightning.pytorch.callbacks import Callback
    from torch.utils.flop_counter import FlopCounterMode

    class StepRecorder(Callback):
        def __init__(self):
            self.times: dict[str, list[float]] = {s: [] for s in STAGES}
            self.flops, self._counter = 0, None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                self._counter = FlopCounterMode(display=False)
                self._counter.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self._counter is not None:
                self._counter.__exit__(None, None, None)
                self.flops, self._counter = self._counter.get_total_flops(), None
            if batch_idx >= warmup:
                for stage in STAGES:
                    self.times[stage].append(float(trainer.callback_metrics[f"time/{stage}"]))

    return StepRecorder()


def run(config: str, steps: int, warmup: int, extra: list[str]) -> dict:
    import torch

    from horse_pl.cli import cli

    args = ["--config", config, *extra, "--trainer.max_steps", str(warmup + steps), "--trainer.limit_val_batches", "0",
            "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
            "--recipe.record", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", tempfile.mkdtemp(prefix="horse_pl-train_step-")]  # never a user's run folder
    built = cli(args, run=False, save_config=False)
    recorder = _recorder(warmup)
    built.trainer.callbacks.append(recorder)
    with built.trainer.strategy.tensor_init_context():  # where fit would build it: on the accelerator
        built.model.configure_model()
    text = built.model.lm.config.get_text_config()
    lm_weight = next(built.model.lm.parameters())
    device, dtype = built.trainer.strategy.root_device, lm_weight.dtype
    rate_before = matmul_rate(text.hidden_size, text.intermediate_size, device=device, dtype=dtype)
    built.trainer.fit(built.model, built.datamodule)
    rate_after = matmul_rate(text.hidden_size, text.intermediate_size, device=device, dtype=dtype)
    if not recorder.times["step"]:
        raise SystemExit(f"{config}: no step was timed; the training set gave fewer than {warmup + 1} edit batches.")
    split = {stage: {"mean": statistics.mean(v), "median": statistics.median(v)} for stage, v in recorder.times.items()}
    rate = (rate_before + rate_after) / 2
    return {
        "kind": "train_step", "threads": torch.get_num_threads(), "device": str(device), "dtype": str(dtype),
        "config": config, "overrides": extra, "timed_steps": len(recorder.times["step"]), "warmup_steps": warmup,
        "seconds": split, "steps": recorder.times["step"],
        "gflop_per_step": recorder.flops / 1e9,
        "matmul_gflops_before": rate_before, "matmul_gflops_after": rate_after,
        "achieved_gflops": recorder.flops / 1e9 / split["step"]["median"],
        "step_at_matmul_rate": recorder.flops / 1e9 / rate,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command, argv, extra = split_at_dashes(argv, "train_step.py")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "horse_smollm2_zsre.yaml"))
    parser.add_argument("--steps", type=positive_int, default=12, help="timed steps")
    parser.add_argument("--warmup", type=positive_int, default=2,
                        help="untimed first steps (the first also counts FLOPs)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
    args = parser.parse_args(argv)
    report = {**provenance(command), **run(args.config, args.steps, args.warmup, extra)}
    write_json(report, args.out)
    s = report["seconds"]
    print(f"{report['config']}: {report['timed_steps']} steps after {report['warmup_steps']} warm-up, "
          f"{report['machine']}")
    print("seconds per step (mean / median): " + ", ".join(
        f"{stage} {s[stage]['mean']:.2f} / {s[stage]['median']:.2f}" for stage in STAGES))
    print(f"work per step {report['gflop_per_step']:.0f} GFLOP; achieved {report['achieved_gflops']:.0f} GFLOP/s; "
          f"{report['dtype']} matmul rate on the layer shapes ({report['device']}) "
          f"{report['matmul_gflops_before']:.0f} (before) / "
          f"{report['matmul_gflops_after']:.0f} (after) GFLOP/s; the work at that rate alone: "
          f"{report['step_at_matmul_rate']:.1f} s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
