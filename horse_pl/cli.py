"""``train.py``: LightningCLI with ``fit``, ``validate`` and ``test`` over :class:`EditorModule` and
:class:`EditDataModule`; bad input ends with one readable sentence instead of a traceback."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from horse_pl.data.datamodule import EditDataModule
from horse_pl.data.records import RecordError
from horse_pl.data.tokenize import TokenizationError
from horse_pl.export import EditorLoadError, read_checkpoint
from horse_pl.models import ModelLoadError
from horse_pl.module import EditorModule, FingerprintMismatch
from horse_pl.recipes import RunPieces, fill_run_pieces

USER_ERRORS = (RecordError, TokenizationError, FingerprintMismatch, ModuleNotFoundError, FileNotFoundError,
               EditorLoadError, ModelLoadError)


class HorseCLI(LightningCLI):
    """LightningCLI whose data module reads the LM's tokenizer from ``model.model`` and whose runs get their folders,
    logger, record and checkpoints from the recipe's name (:mod:`horse_pl.recipes`)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model", "data.model")
        parser.add_class_arguments(RunPieces, "recipe")

    def before_instantiate_classes(self) -> None:
        fill_run_pieces(self.config[self.subcommand] if self.subcommand else self.config)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI replaces the model's settings with the checkpoint's when resuming; refuse a run that asks
        for another base model than the checkpoint's (it would silently train on for the checkpoint's own),
        say which other settings the checkpoint's replace, and report an unreadable checkpoint in one sentence."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return super()._parse_ckpt_path()
        read_checkpoint(ckpt_path)
        asked = self.config[subcommand]["model"].clone()
        super()._parse_ckpt_path()
        kept = self.config[subcommand]["model"]
        if asked.get("model") != kept.get("model"):
            raise FingerprintMismatch(f"The checkpoint '{ckpt_path}' was trained on base model '{kept.get('model')}', "
                                      f"but this run asks for '{asked.get('model')}'; resume with the checkpoint's "
                                      "model, or start a new run (without --ckpt_path) for the other one.")
        changed = sorted(k for k in asked.keys() if asked.get(k) != kept.get(k))
        if changed:
            print(f"note: resuming from '{ckpt_path}' keeps the checkpoint's model settings; these differ from the "
                  f"ones asked and are not used: {', '.join(changed)}", file=sys.stderr)


# Lightning warnings about choices this module makes on purpose: the frozen LM stays in eval mode, and a
# checkpoint holds the hypernetwork after its optimiser step, which is what resuming needs (see
# tests/test_training.py::test_resume_continues_exactly).
EXPECTED_WARNINGS = (r"Found \d+ module\(s\) in eval mode at the start of training",
                     r"Using ModelCheckpoint with manual optimization and every_n_train_steps")


def cli(args=None, run: bool = True, save_config: bool = True) -> HorseCLI:
    """Build (and by default run) the CLI; ``args`` as a list or dict for tests. ``save_config=False`` (benchmarks)
    writes no ``config.yaml`` into the run folder, which may be a user's real run."""
    for message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    # The data module shards each global edit batch itself (see EditBatch.shard), so Lightning must not
    # replace its sampler with a DistributedSampler; and evaluating an editor needs gradients (the edit
    # prompts' value gradients), which torch.inference_mode, Lightning's default for validate/test, forbids.
    saving = {"save_config_kwargs": {"overwrite": True}} if save_config else {"save_config_callback": None}
    return HorseCLI(EditorModule, EditDataModule, args=args, run=run, **saving,
                    trainer_defaults={"use_distributed_sampler": False, "inference_mode": False})


def main(args=None) -> None:
    try:
        cli(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
