"""Which images each pretraining step sees, and their random crops, flips and masks.

Every random choice about the data is a function of (seed, epoch, image index) alone:

- each epoch visits the images in a permutation seeded by (seed, epoch); step k of the epoch takes
  the k-th `batch_size` block of it, split into micro-batches over processes and accumulation;
- each image's augmentation and its masking noise (and, with `views=2`, a second augmentation of
  the same image, drawn after them) come from a generator seeded by (seed, epoch, index), in
  whichever DataLoader worker loads it.

So a run's batches do not depend on the number of processes, `accum_steps`, `num_workers`, or on
being resumed mid-epoch: one process with batch 2B, two with B each, and B with 2 accumulation
steps see the same images, augmented and masked alike.

Fine-tuning keeps the sampling it always had (torch's RandomSampler on a seeded generator, the
augmentation drawn from the loading process's RNG); `ShardedBatches` splits its global batches
over processes and resumes an epoch mid-way, `RankSeededWorkers` keeps the processes' DataLoader
workers from drawing the same crops (pemae.engine.finetune).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import BatchSampler, Dataset, Sampler

from pemae.engine.runtime import seed_everything


def mixed_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (distinct tuples give distinct seeds, in practice)."""
    h = 0x2545F4914F6CDD1D
    for p in parts:
        h = (h ^ (p + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) % 2**63
    return h


class SeededViews(Dataset):
    """Items keyed by `epoch * len(dataset) + index`: (augmented image, masking noise [N]), and
    with `views=2` a second augmented view of the same image after them.

    The wrapped dataset's transform and the noise draw from torch's RNG, seeded per item; the
    caller's RNG state is left as it was. The first view and the noise are the same whatever
    `views` is: the second view is drawn last.
    """

    def __init__(self, dataset: Dataset, seed: int, num_patches: int, views: int = 1):
        if views not in (1, 2):
            raise ValueError(f"views = {views}: must be 1 or 2")
        self.dataset = dataset
        self.seed = seed
        self.num_patches = num_patches
        self.views = views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> tuple[torch.Tensor, ...]:
        epoch, index = divmod(key, len(self.dataset))
        with torch.random.fork_rng(devices=[]):  # the CPU generator only (CUDA's is untouched)
            torch.random.default_generator.manual_seed(mixed_seed(self.seed, epoch, index))
            img, _ = self.dataset[index]  # [C, H, W]
            noise = torch.rand(self.num_patches)  # [N]
            if self.views == 1:
                return img, noise
            second, _ = self.dataset[index]  # [C, H, W], a fresh crop and flip of the same image
        return img, noise, second


class GlobalBatchSampler(Sampler[list[int]]):
    """This process's micro-batches (lists of `SeededViews` keys) from `start_step` to the end.

    A step's global batch of `batch_size` images is split into `world_size * accum_steps`
    micro-batches: accumulation step a of rank r gets block `a * world_size + r`.
    """

    def __init__(self, num_images: int, batch_size: int, total_steps: int, seed: int,
                 world_size: int = 1, rank: int = 0, accum_steps: int = 1, start_step: int = 0):
        parts = world_size * accum_steps
        if batch_size % parts:
            raise ValueError(f"batch {batch_size} does not split into {parts} equal micro-batches")
        self.num_images, self.batch_size, self.total_steps = num_images, batch_size, total_steps
        self.seed, self.world_size, self.rank = seed, world_size, rank
        self.accum_steps, self.start_step = accum_steps, start_step
        self.micro_batch = batch_size // parts
        self.steps_per_epoch = num_images // batch_size  # the last partial batch is dropped

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.accum_steps

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The permutation of image indices visited in `epoch`: [num_images]."""
        generator = torch.Generator().manual_seed(mixed_seed(self.seed, epoch))
        return torch.randperm(self.num_images, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, order = None, None
        for step in range(self.start_step, self.total_steps):
            e, k = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, order = e, self.epoch_order(e)
            batch = order[k * self.batch_size:(k + 1) * self.batch_size]  # [batch_size]
            for a in range(self.accum_steps):
                block = a * self.world_size + self.rank
                ids = batch[block * self.micro_batch:(block + 1) * self.micro_batch]  # [micro]
                yield (ids + epoch * self.num_images).tolist()


class ShardedBatches(Sampler[list[int]]):
    """This process's part of each global batch of `batches` (a BatchSampler, shuffled by its own
    generator, the same on every process): rank r of w takes the r-th of w equal contiguous
    blocks. One process: the batches themselves.

    `resume_at(k)` makes the next epoch start at its batch k: batches 0..k-1 are still drawn (no
    image is loaded), so the shuffling generator ends the epoch where an uninterrupted one does.
    """

    def __init__(self, batches: BatchSampler, world_size: int = 1, rank: int = 0):
        if batches.batch_size % world_size:
            raise ValueError(f"batch {batches.batch_size} does not split into {world_size} equal parts")
        self.batches, self.world_size, self.rank = batches, world_size, rank
        self.part = batches.batch_size // world_size
        self.skip = 0

    def resume_at(self, batch: int) -> None:
        """Start the next epoch at its batch `batch` (a run resumed mid-epoch)."""
        self.skip = batch

    def __len__(self) -> int:
        return len(self.batches) - self.skip

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(self.batches):  # drawn to the end: the generator moves as always
            if i >= skip:
                yield batch[self.rank * self.part:(self.rank + 1) * self.part]


class RankSeededWorkers:
    """A DataLoader `worker_init_fn` for several processes: their loaders draw the same base seed
    (from the shared shuffling generator), so worker w of every process would draw the same
    crops; this reseeds each worker (Python, NumPy, torch) from its seed and the rank."""

    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self, worker_id: int) -> None:
        seed_everything(mixed_seed(torch.initial_seed(), self.rank))  # initial: base seed + worker id
