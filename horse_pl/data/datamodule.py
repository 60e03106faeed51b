"""The LightningDataModule: one :class:`~horse_pl.data.batch.EditBatch` of ``n_edits`` requests per step.

The batch's views (edit, rephrase, locality, and for evaluation the CounterFact and portability views) are
built by :mod:`horse_pl.data.batch`; this module reads the record files, holds out the development split and
orders the edit batches so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Literal

import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from horse_pl.data.batch import EVAL_VIEWS, TRAIN_VIEWS, EditCollator, tokenize_requests
from horse_pl.data.records import EditRequest, LoadReport, RecordError, hold_out_dev, load_requests
from horse_pl.models import DEFAULT_MODEL, load_tokenizer

log = logging.getLogger(__name__)


class EditBatchSampler(Sampler[list[int]]):
    """Yields lists of ``n_edits`` record indices, reshuffled every epoch from ``seed``.

    The order depends only on (seed, epoch), so a resumed run can skip the edit batches it already
    trained on and see exactly the batches an uninterrupted run would.
    """

    def __init__(self, n_records: int, n_edits: int, shuffle: bool, seed: int = 0, drop_last: bool = False):
        self.n_records, self.n_edits, self.shuffle = n_records, n_edits, shuffle
        self.seed, self.drop_last = seed, drop_last
        self.epoch, self._skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, n_batches: int) -> None:
        """Skip the first ``n_batches`` of the next iteration (mid-epoch resume)."""
        self._skip = n_batches

    def __len__(self) -> int:
        full, rest = divmod(self.n_records, self.n_edits)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            order = torch.randperm(self.n_records, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.n_records)
        skip, self._skip = self._skip, 0
        for b in range(skip, len(self)):
            yield order[b * self.n_edits:(b + 1) * self.n_edits].tolist()


class EditDataModule(L.LightningDataModule):
    """Edit batches from zsRE, CounterFact, KnowEdit or plain request files (local JSON/JSONL[.gz] or a hub id).

    Args:
        train_path: training records (file path or Hugging Face dataset id).
        val_path: evaluation records; defaults to none (no validation).
        test_path: test records; defaults to ``val_path``.
        dataset: record layout: ``zsre``, ``counterfact``, ``knowedit``, ``requests`` or ``auto``.
        model: tokenizer source (the LM's name; linked from the module by ``train.py``).
        n_edits: requests edited together in one training step.
        batch_size: sequences per forward/backward micro-batch.
        val_n_edits: requests edited together at validation (default ``n_edits``).
        val_limit: evaluate only the first ``val_limit`` records of the evaluation file.
        val_shuffle: cut the evaluation records into edit batches at random (fixed by ``seed``, the same
            batches at every evaluation) instead of in file order. The released HORSE/MALMEN code
            evaluates this way; zsRE and CounterFact list records of one subject next to each other,
            so in-order batches edit several facts of the same subject together, a harder setting.
        max_length: longest prompt + answer in tokens; longer records are an error, never truncated.
        skip_invalid: skip invalid training records (counted and logged) instead of failing.
        dev_size: hold out the last ``dev_size`` valid training records as a development split: never
            trained on, for choosing settings without looking at the evaluation records.
        val_split: validate on the evaluation records (``eval``, ``val_path``) or on the held-out
            development records (``dev``, needs ``dev_size``).
        seed: shuffling seed.
        num_workers: DataLoader worker processes.
        general_tasks: general abilities of the model as each evaluation edit batch leaves it, against the
            unedited model (retention = after / before, logged as ``val/general/<task>_retention``): any of
            ``open_domain_qa`` and the choice tasks of :data:`horse_pl.sequential.general.TASKS`, with the
            perplexity of the fixed text sample always scored (``[]``: perplexity alone). None (default): not
            scored, since it adds a pass over the general data per evaluation batch. Data from the module's
            ``general_data`` folder.
        general_limit: examples per general task.
    """

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        dataset: str = "auto",
        model: str = DEFAULT_MODEL,
        n_edits: int = 128,
        batch_size: int = 32,
        val_n_edits: int | None = None,
        val_limit: int | None = None,
        val_shuffle: bool = False,
        max_length: int = 256,
        skip_invalid: bool = True,
        dev_size: int = 0,
        val_split: Literal["eval", "dev"] = "eval",
        seed: int = 0,
        num_workers: int = 0,
        general_tasks: list[str] | None = None,
        general_limit: int = 200,
    ):
        super().__init__()
        if n_edits < 1 or batch_size < 1:
            raise ValueError(f"n_edits ({n_edits}) and batch_size ({batch_size}) must be positive.")
        if val_split not in ("eval", "dev") or (val_split == "dev" and dev_size < 1):
            raise ValueError(f"--data.val_split must be 'eval' or 'dev' (with --data.dev_size > 0), not '{val_split}' "
                             f"with dev_size={dev_size}.")
        self.save_hyperparameters()
        self.reports: dict[str, LoadReport] = {}
        self.splits: dict[str, datasets.Dataset] = {}
        self.requests: dict[str, list[EditRequest]] = {}
        self.tokenizer = None
        self._train_sampler: EditBatchSampler | None = None

    def _read(self, path: str, split: str, training: bool) -> list[EditRequest]:
        hp = self.hparams
        limit = None if training else hp.val_limit
        require = ("rephrase", "locality_prompt") if training else ()
        requests, report = load_requests(path, hp.dataset, skip_invalid=hp.skip_invalid and training,
                                         require=require, limit=limit)
        self.reports[split] = report
        if report.n_invalid:
            log.warning("Skipped invalid %s records: %s", split, report.summary())
        return requests

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(hp.model)
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": []}.get(stage or "fit",
                                                                                                     ["train", "val"])
        paths = {"train": hp.train_path, "val": hp.val_path, "test": hp.test_path or hp.val_path}
        if hp.val_split == "dev":
            paths["val"] = hp.train_path
        for split in wanted:
            if split in self.splits or paths[split] is None:
                if split == "train" and paths[split] is None:
                    raise RecordError("EditDataModule needs data.train_path to fit; point it at a training file.")
                continue
            training = split == "train"
            from_dev = split == "val" and hp.val_split == "dev"
            requests, ids = self._split_requests(split, paths[split], training, from_dev)
            views = TRAIN_VIEWS if training else EVAL_VIEWS
            self.requests[split] = requests
            self.splits[split] = tokenize_requests(self.tokenizer, requests, views, hp.max_length,
                                                   where=f"{paths[split]}: record", record_ids=ids)
            n_edits = hp.n_edits if training else (hp.val_n_edits or hp.n_edits)
            rest = len(requests) % n_edits
            if rest:
                what = "dropped each epoch (reshuffled, so every record is still seen)" if training else \
                    "edited together as a last, smaller edit batch"
                log.info("%s: %d requests = %d edit batches of %d; the remaining %d are %s.", split, len(requests),
                         len(requests) // n_edits, n_edits, rest, what)

    def _split_requests(self, split: str, path: str, training: bool, from_dev: bool) -> tuple[list, list[int]]:
        """The requests of one split and their record ids; the training file loses its dev records."""
        hp = self.hparams
        if not (training or from_dev):
            requests = self._read(path, split, training=False)
            return requests, self.reports[split].kept
        requests = self._read(path, split, training=True)
        train, train_ids, dev, dev_ids = hold_out_dev(requests, self.reports[split], hp.dev_size)
        if not training:
            dev, dev_ids = dev[:hp.val_limit], dev_ids[:hp.val_limit]
        return (train, train_ids) if training else (dev, dev_ids)

    def _loader(self, split: str, training: bool) -> DataLoader:
        hp = self.hparams
        n_edits = hp.n_edits if training else (hp.val_n_edits or hp.n_edits)
        shuffle = training or hp.val_shuffle  # evaluation batches: epoch 0's order, so every evaluation is the same
        sampler = EditBatchSampler(len(self.splits[split]), n_edits, shuffle=shuffle, seed=hp.seed, drop_last=training)
        if training and len(sampler) == 0:
            raise RecordError(f"{hp.train_path} has {len(self.splits[split])} valid records, "
                              f"fewer than n_edits={n_edits}.")
        views = TRAIN_VIEWS if training else EVAL_VIEWS
        return DataLoader(self.splits[split], batch_sampler=sampler, num_workers=hp.num_workers,
                          collate_fn=EditCollator(views, hp.batch_size, self.tokenizer.pad_token_id),
                          persistent_workers=False)

    def train_dataloader(self) -> DataLoader:
        loader = self._loader("train", training=True)
        self._train_sampler = loader.batch_sampler
        trainer = self.trainer
        if trainer is not None and trainer.global_step > 0:
            # Mid-epoch resume: skip the edit batches this epoch already trained on (one step per batch).
            done = trainer.global_step - trainer.current_epoch * len(loader.batch_sampler)
            if 0 < done < len(loader.batch_sampler):
                loader.batch_sampler.set_epoch(trainer.current_epoch)
                loader.batch_sampler.skip_next(done)
        return loader

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", training=False) if "val" in self.splits else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", training=False)
