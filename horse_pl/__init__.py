"""horse_pl: massive knowledge editing of language models (HORSE, MALMEN, MEND) with PyTorch Lightning."""

__version__ = "0.1.0"
