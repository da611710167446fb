"""Training data by slot: slot = update x effective batch + position, its sample and augmentation fixed by (seed, slot).

A slot's sample comes from a per-pass permutation (Caffe reshuffles at every wrap) and its augmentation
from a Generator seeded with (seed, slot), so crops do not depend on the world size or the batch split,
and a resumed run reads exactly what the uninterrupted run would have read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from converter.errors import CaffeError, listed
from segmentation.data import Sample, check_pair, read_image, read_label
from segmentation.transforms import TransformParams, transform


class TrainSlots(Dataset):
    """Indexed by global slot: the slot's sample, augmented with a Generator seeded by (seed, slot)."""

    def __init__(self, samples: Sequence[Sample], params: TransformParams, num_classes: int, seed: int) -> None:
        self.samples = list(samples)
        self.params = params
        self.num_classes = num_classes
        self.seed = seed
        self._permutations: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def sample_index(self, slot: int) -> int:
        pass_index, position = divmod(slot, len(self.samples))
        order = self._permutations.get(pass_index)
        if order is None:
            order = np.random.default_rng([self.seed, pass_index, 0x5EED]).permutation(len(self.samples))
            self._permutations = {pass_index: order}  # keep one pass: slots arrive in order
        return int(order[position])

    def __getitem__(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.samples[self.sample_index(slot)]
        image = read_image(sample.image)
        label = read_label(sample.label, self.num_classes)
        check_pair(image, label, sample)
        rng = np.random.default_rng([self.seed, slot])
        data, crop_label = transform(image, label, self.params, rng)
        return torch.from_numpy(data), torch.from_numpy(crop_label)


class SlotSampler(Sampler[int]):
    """The slots this rank reads, in the order it consumes them: per update, per micro-step, per batch item.

    Micro-step i of rank r reads slots (i * world + r) * batch + b of the update, b < batch.
    """

    def __init__(self, start_update: int, stop_update: int, *, batch_size: int, iter_size: int, world_size: int, rank: int) -> None:
        self.start, self.stop = start_update, stop_update
        self.batch_size, self.iter_size = batch_size, iter_size
        self.world_size, self.rank = world_size, rank

    def __len__(self) -> int:
        return (self.stop - self.start) * self.iter_size * self.batch_size

    def __iter__(self) -> Iterator[int]:
        effective = self.batch_size * self.iter_size * self.world_size
        for update in range(self.start, self.stop):
            for step in range(self.iter_size):
                first = update * effective + (step * self.world_size + self.rank) * self.batch_size
                yield from range(first, first + self.batch_size)


def _check_sample(sample: Sample, num_classes: int) -> None:
    from PIL import Image, UnidentifiedImageError

    label = read_label(sample.label, num_classes)
    try:
        with Image.open(sample.image) as image:
            width, height = image.size
    except (OSError, UnidentifiedImageError) as error:
        raise CaffeError(f"cannot read the image: {error}", path=sample.image) from None
    if (height, width) != label.shape:
        raise CaffeError(f"image is {width}x{height} but its label {sample.label} is {label.shape[1]}x{label.shape[0]}", path=sample.image)


def check_dataset(samples: Sequence[Sample], num_classes: int, *, workers: int = 8, progress: bool = True) -> None:
    """Read every label (values in range) and every image header (size equal to the label's) before training."""
    unlabelled = [str(sample.image) for sample in samples if sample.label is None]
    if unlabelled:
        raise CaffeError(f"{len(unlabelled)} listed images have no label: {listed(unlabelled)}")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        checks = pool.map(lambda sample: _check_sample(sample, num_classes), samples)
        for _ in tqdm(checks, total=len(samples), desc="checking data", unit="img", disable=not progress, leave=False):
            pass

def _worker_init(_: int) -> None:
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def make_loader(dataset: TrainSlots, sampler: SlotSampler, *, batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader yielding the rank's micro-batches in slot order (workers keep the order)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if workers else None,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        drop_last=False,
    )
