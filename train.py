"""Meta-train, validate and test knowledge editors: ``python train.py fit --config configs/quickstart.yaml``."""

from horse_pl.cli import main

if __name__ == "__main__":
    main()
