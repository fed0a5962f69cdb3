#!/usr/bin/env python
"""``epban train-sr`` as a script: train an SR network with L1 + SSIM + Efficient-PBAN losses (see ``--help``).

    python scripts/train_sr.py --train DIV2K/HR --val Set5/HR --scale 4 --net edsr \
        --ssim 1 --pban 0.1 --pban-weights runs/metric/best
    torchrun --nproc_per_node 4 scripts/train_sr.py ...            # DDP
    python scripts/train_sr.py ... --ablation                       # the paper's four loss settings
    python scripts/train_sr.py --train DIV2K/HR --net-weights RealESRGAN_x4plus.pth \
        --pban 0.1 --pban-weights runs/metric/best                  # fine-tune any SR model spandrel reads
"""
import sys

from epban.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-sr", *sys.argv[1:]]))
