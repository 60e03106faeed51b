"""Edit-request records, tokenisation and the LightningDataModule."""

from horse_pl.data.datamodule import EditDataModule
from horse_pl.data.records import EditRequest, RecordError, load_requests

__all__ = ["EditDataModule", "EditRequest", "RecordError", "load_requests"]
