"""EditDataModule: edit batches of n_edits requests in micro-batches, seeded shuffling, remainders, resume."""

import logging

import pytest
import torch
from conftest import CF_EVAL, ZSRE_EVAL, ZSRE_TRAIN

from horse_pl.data import EditDataModule
from horse_pl.data.datamodule import EditBatchSampler
from horse_pl.data.records import RecordError


def _dm(tiny_llama, **kw):
    args = dict(train_path=str(ZSRE_TRAIN), val_path=str(ZSRE_EVAL), dataset="zsre", model=tiny_llama,
                n_edits=10, batch_size=4, val_limit=25, max_length=1024)
    args.update(kw)
    dm = EditDataModule(**args)
    dm.setup("fit")
    return dm


def test_train_batch_structure(tiny_llama):
    dm = _dm(tiny_llama)
    batch = next(iter(dm.train_dataloader()))
    assert batch.n_edits == 10 and batch.index.shape == (10,)
    for view in ("edit", "rephrase", "locality"):
        sizes = [mb["input_ids"].shape[0] for mb in batch[view]]
        assert sizes == [4, 4, 2]
        assert sorted(batch[view].rows.tolist()) == list(range(10))
        for mb in batch[view]:
            # the edit view also marks each prompt's subject (keys of editors with positions: subject)
            assert set(mb) == {"input_ids", "attention_mask", "labels"} | ({"key_mask"} if view == "edit" else set())
            assert ((mb["labels"] != -100).sum(1) > 0).all()  # every sequence has answer tokens
            if view == "edit":
                assert (mb["key_mask"].sum(1) == 1).all()
    assert "portability" not in batch  # training views only


def test_edit_rows_map_back_to_records(tiny_llama):
    dm = _dm(tiny_llama)
    batch = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    seq = 0
    mb = batch["edit"].micro_batches[0]
    row = batch["edit"].rows[seq]
    request = dm.requests["train"][dm.reports["train"].kept.index(int(batch.index[row]))]
    labels = mb["labels"][seq]
    assert tok.decode(labels[labels != -100]) == " " + request.target


def test_shuffle_is_seeded_and_epochs_differ(tiny_llama):
    first = [b.index.tolist() for b, _ in zip(_dm(tiny_llama, seed=3).train_dataloader(), range(3))]
    again = [b.index.tolist() for b, _ in zip(_dm(tiny_llama, seed=3).train_dataloader(), range(3))]
    other = [b.index.tolist() for b, _ in zip(_dm(tiny_llama, seed=4).train_dataloader(), range(3))]
    assert first == again and first != other
    sampler = EditBatchSampler(100, 10, shuffle=True, seed=0, drop_last=True)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != epoch0


def test_resume_skips_batches_already_seen():
    sampler = EditBatchSampler(100, 10, shuffle=True, seed=0, drop_last=True)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.skip_next(4)
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # only the next iteration skips


def test_validation_remainder_is_kept_and_logged(tiny_llama, caplog):
    with caplog.at_level(logging.INFO):
        dm = _dm(tiny_llama)
    batches = list(dm.val_dataloader())
    assert [b.n_edits for b in batches] == [10, 10, 5]
    assert sorted(i for b in batches for i in b.index.tolist()) == list(range(25))  # every record once
    assert "remaining 5 are edited together as a last, smaller edit batch" in caplog.text
    assert "35 invalid" in caplog.text
    assert {"portability", "edit_true", "locality_new"} <= set(batches[0].views)


def test_validation_batches_in_file_order_or_seeded_random(tiny_llama):
    in_order = [b.index.tolist() for b in _dm(tiny_llama).val_dataloader()]
    assert in_order == [list(range(10)), list(range(10, 20)), list(range(20, 25))]
    dm = _dm(tiny_llama, val_shuffle=True, seed=5)
    shuffled = [b.index.tolist() for b in dm.val_dataloader()]
    assert [b.index.tolist() for b in dm.val_dataloader()] == shuffled  # the same batches every evaluation
    assert [b.index.tolist() for b in _dm(tiny_llama, val_shuffle=True, seed=5).val_dataloader()] == shuffled
    assert shuffled != in_order and [len(b) for b in shuffled] == [10, 10, 5]
    assert sorted(i for b in shuffled for i in b) == list(range(25))  # still the first val_limit records, each once
    assert [b.index.tolist() for b in _dm(tiny_llama, val_shuffle=True, seed=6).val_dataloader()] != shuffled


def test_counterfact_eval_views(tiny_llama):
    dm = _dm(tiny_llama, train_path=str(CF_EVAL), val_path=str(CF_EVAL), dataset="counterfact")
    batch = next(iter(dm.val_dataloader()))
    assert batch["edit_true"].n_sequences == 10 and batch["locality_new"].n_sequences == 10


def test_works_with_worker_processes(tiny_llama):
    dm = _dm(tiny_llama, num_workers=1)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch["edit"][0]["input_ids"], torch.Tensor)


def test_too_few_records_and_missing_train_path(tiny_llama, tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt": "a?", "target": "b", "rephrase": "c?", "locality_prompt": "d?", '
                    '"locality_answer": "e"}\n')
    dm = EditDataModule(train_path=str(path), model=tiny_llama, n_edits=4)  # one record
    dm.setup("fit")
    with pytest.raises(RecordError, match="fewer than n_edits=4"):
        dm.train_dataloader()
    with pytest.raises(RecordError, match="needs data.train_path"):
        EditDataModule(model=tiny_llama).setup("fit")


def test_dev_split_is_held_out_of_training_and_validated_on(tiny_llama):
    dm = _dm(tiny_llama, dev_size=30, val_split="dev", val_limit=20)
    kept = dm.reports["train"].kept
    dev_ids = set(dm.splits["val"]["index"])
    train_ids = set(dm.splits["train"]["index"])
    assert len(dev_ids) == 20 and not dev_ids & train_ids
    assert sorted(dev_ids) == kept[-30:-10]  # the last 30 valid records, the first 20 of them evaluated
    assert len(train_ids) == len(kept) - 30
    seen = {i for batch in dm.train_dataloader() for i in batch.index.tolist()}
    assert not seen & set(kept[-30:])
    with pytest.raises(ValueError, match="val_split"):
        EditDataModule(train_path=str(ZSRE_TRAIN), val_split="dev")


def test_edit_batch_shards_partition_its_sequences_and_moves_as_one(tiny_llama):
    """Under DDP every process keeps micro-batches rank::world_size of each view with their rows; the shards
    together hold every sequence once. Lightning moves the whole typed batch through its ``to``."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from horse_pl.data.batch import EditBatch

    batch = next(iter(_dm(tiny_llama).train_dataloader()))
    shards = [batch.shard(rank, 2) for rank in range(2)]
    for view in ("edit", "rephrase", "locality"):
        assert [s[view].n_sequences for s in shards] == [6, 4]  # micro-batches of 4, 4, 2: ranks get (4, 2) and 4
        assert sorted(torch.cat([s[view].rows for s in shards]).tolist()) == list(range(10))
        for shard in shards:
            assert sum(mb["input_ids"].shape[0] for mb in shard[view]) == shard[view].n_sequences
    assert all(s.n_edits == 10 and torch.equal(s.index, batch.index) for s in shards)  # the global batch's size
    assert batch.shard(0, 1) is batch
    moved = move_data_to_device(batch, "cpu")
    assert isinstance(moved, EditBatch) and torch.equal(moved["edit"].micro_batches[0]["input_ids"],
                                                        batch["edit"].micro_batches[0]["input_ids"])
