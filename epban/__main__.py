"""``python -m epban``: the ``epban`` command (``torchrun -m epban train-metric ...`` for DDP)."""
import sys

from epban.cli import main

sys.exit(main())
