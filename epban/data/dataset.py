"""The paired dataset and the samplers that make training reproducible and resumable.

``EpochBatchSampler`` yields batches of ``(index, item_seed)``: the permutation and the
per-item augmentation seeds are functions of (run seed, epoch) only, so a run can restart
mid-epoch from a batch number, and every rank of a DDP job slices the same global order.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from epban.data.manifest import ManifestError, Sample
from epban.imageio import ImageReadError, read_image


class PairDataset(Dataset):
    """``dataset[i]`` or ``dataset[(i, seed)]`` -> ``{"sr", "hr", "score", "index"}``.

    Each image is decoded once per item. With a seed, the transform draws from
    ``numpy.random.default_rng(seed)``; without one, it must be deterministic (evaluation).
    """

    def __init__(self, samples: list[Sample], transform):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        s = self.samples[index]
        try:
            sr, hr = read_image(s.sr_path), read_image(s.hr_path)
        except ImageReadError as exc:
            raise ManifestError(f"{s.where}: {exc}") from None
        if sr.shape != hr.shape:
            raise ManifestError(f"{s.where}: SR image {s.sr_path} is {sr.shape[2]}x{sr.shape[1]} but its HR "
                                f"{s.hr_path} is {hr.shape[2]}x{hr.shape[1]}")
        rng = np.random.default_rng(seed) if seed is not None else None
        sr, hr = self.transform(sr, hr, rng)
        return {"sr": sr, "hr": hr, "score": torch.tensor(s.score, dtype=torch.float32), "index": index}


class EpochBatchSampler(Sampler):
    """Shuffled batches of ``(index, item_seed)`` for one rank, reproducible from (seed, epoch).

    The global batch is ``batch_size * world_size`` items; rank r takes the r-th slice of
    each. ``drop_last`` drops the incomplete last global batch (BatchNorm dislikes tiny
    batches). ``start_batch`` skips batches already trained on (mid-epoch resume).
    """

    def __init__(self, n: int, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True):
        if n <= 0 or batch_size <= 0:
            raise ValueError(f"need n > 0 and batch_size > 0, got n={n}, batch_size={batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        global_batch = batch_size * world_size
        # With fewer items than one global batch, keep the partial batch rather than nothing.
        self.drop_last = drop_last and n >= global_batch
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def num_batches(self) -> int:
        global_batch = self.batch_size * self.world_size
        return self.n // global_batch if self.drop_last else -(-self.n // global_batch)

    def __len__(self) -> int:
        return max(0, self.num_batches() - self.start_batch)

    def epoch_order(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n)
        seeds = rng.integers(0, 2**63 - 1, size=self.n, dtype=np.int64)
        return order, seeds

    def __iter__(self):
        order, seeds = self.epoch_order()
        global_batch = self.batch_size * self.world_size
        for b in range(self.start_batch, self.num_batches()):
            chunk = order[b * global_batch:(b + 1) * global_batch]
            mine = chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            if len(mine) == 0:  # a short last batch can leave a rank nothing; give it one item
                mine = chunk[-1:]
            yield [(int(i), int(seeds[i])) for i in mine]


class SizeGroupedBatchSampler(Sampler):
    """Evaluation batches of equal-sized images (full-resolution sets mix sizes), for one rank.

    Rank r evaluates ``indices[r::world_size]``; the caller gathers predictions by index.
    """

    def __init__(self, sizes: list[tuple[int, int]], batch_size: int, *, rank: int = 0, world_size: int = 1):
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in range(rank, len(sizes), world_size):
            groups[tuple(sizes[i])].append(i)
        self.batches = [idx[j:j + batch_size] for idx in groups.values() for j in range(0, len(idx), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)
