"""Meta-train, validate, test and export knowledge editors.

    python train.py fit --config configs/quickstart.yaml
    python train.py validate --config configs/quickstart.yaml --ckpt_path checkpoints/quickstart/last.ckpt
    python train.py export --ckpt_path checkpoints/quickstart/last.ckpt --out editors/quickstart
"""

import sys

from horse_pl.cli import main

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "export":
        from horse_pl.export import main as export_main

        sys.exit(export_main(sys.argv[2:]))
    main()
