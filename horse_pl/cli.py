"""``train.py``: LightningCLI with ``fit``, ``validate`` and ``test`` over :class:`EditorModule` and
:class:`EditDataModule`; bad input ends with one readable sentence instead of a traceback."""

from __future__ import annotations

import sys
import warnings

from lightning.pytorch.cli import LightningCLI

from horse_pl.data.datamodule import EditDataModule
from horse_pl.data.records import RecordError
from horse_pl.data.tokenize import TokenizationError
from horse_pl.module import EditorModule, FingerprintMismatch

USER_ERRORS = (RecordError, TokenizationError, FingerprintMismatch, ModuleNotFoundError, FileNotFoundError)


class HorseCLI(LightningCLI):
    """LightningCLI whose data module reads the LM's tokenizer from ``model.model``."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model", "data.model")


# Lightning warnings about choices this module makes on purpose: the frozen LM stays in eval mode, and a
# checkpoint holds the hypernetwork after its optimiser step, which is what resuming needs (see
# tests/test_training.py::test_resume_continues_exactly).
EXPECTED_WARNINGS = (r"Found \d+ module\(s\) in eval mode at the start of training",
                     r"Using ModelCheckpoint with manual optimization and every_n_train_steps")


def cli(args=None, run: bool = True) -> HorseCLI:
    """Build (and by default run) the CLI; ``args`` as a list or dict for tests."""
    for message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    # The data module shards each global edit batch itself (see shard_batch), so Lightning must not
    # replace its sampler with a DistributedSampler; and evaluating an editor needs gradients (the edit
    # prompts' value gradients), which torch.inference_mode, Lightning's default for validate/test, forbids.
    return HorseCLI(EditorModule, EditDataModule, args=args, run=run, save_config_kwargs={"overwrite": True},
                    trainer_defaults={"use_distributed_sampler": False, "inference_mode": False})


def main(args=None) -> None:
    try:
        cli(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
