"""torch Dataset over the crop cache: a trial's crop size cut on the fly, resized, augmented.

Reads only the memory-mapped patches: no DICOM file is opened during training. The memmap is
reopened lazily in each DataLoader worker (pickling a memmap would copy the whole array).
"""
from __future__ import annotations

import numpy as np

from spine_ml.competition import vocabulary as V
from spine_ml.errors import UserError
from spine_ml.prepare import augment as A

from torch.utils.data import Dataset

CONDITION_INDEX = {c: i for i, c in enumerate(V.CONDITIONS)}
LEVEL_INDEX = {lv: i for i, lv in enumerate(V.LEVELS)}


class CropSizeError(UserError):
    """model.crop_px does not fit in the cached patch."""


class CropDataset(Dataset):
    """Items: {"image": float32 (slices, input_px, input_px), "condition": int (after any flip),
    "label": int (-1 = blank), "weight": float, "row": int (index row), "level": int}."""

    def __init__(self, cache, rows: np.ndarray, crop_px: int, input_px: int | None = None,
                 augment=None, seed: int = 0):
        if crop_px > cache.patch_px:
            raise CropSizeError(
                f"model.crop_px={crop_px} is larger than the cached patch of {cache.patch_px} px "
                f"(prepare.patch_mm={cache.meta['prepare']['patch_mm']:g} / prepare.pixel_mm={cache.pixel_mm:g}); "
                f"lower model.crop_px or raise prepare.patch_mm")
        rows = np.asarray(rows, dtype=np.int64)
        index = cache.index
        samples = index["sample"].to_numpy()[rows]
        if (samples < 0).any():
            bad = rows[samples < 0][:5].tolist()
            raise ValueError(f"rows {bad} have no cached sample (index.sample == -1); select rows with sample >= 0")
        self.rows = rows
        self.samples = samples
        self.conditions = index.condition.to_numpy()[rows]
        self.levels = np.array([LEVEL_INDEX[lv] for lv in index.level.to_numpy()[rows]], dtype=np.int64)
        self.labels = index.label.to_numpy()[rows].astype(np.int64)
        self.weights = index.sample_weight.to_numpy()[rows].astype(np.float32)
        self.crop_px, self.input_px = int(crop_px), input_px
        self.augment, self.seed, self.epoch = augment, int(seed), 0
        self._jitters: list[A.Jitter] = []
        self._jitters_epoch: int | None = None
        self._patches = cache.patches
        self._patches_file = cache.path / "patches.f16"
        self._shape = tuple(cache.patches.shape)

    def set_epoch(self, epoch: int) -> None:
        """Augmentation draws depend on (seed, epoch, item): reproducible with any worker count."""
        self.epoch = int(epoch)

    def _jitter(self, item: int) -> A.Jitter:
        if self._jitters_epoch != self.epoch:  # one vectorised draw per epoch (and per worker)
            rng = np.random.default_rng([self.seed, self.epoch])
            self._jitters, self._jitters_epoch = A.draw_jitters(rng, self.augment, len(self.rows)), self.epoch
        return self._jitters[item]

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self):
        state = self.__dict__.copy()
        if isinstance(self._patches, np.memmap):
            state["_patches"] = None
        state["_jitters"], state["_jitters_epoch"] = [], None  # redrawn where used, cheaper than shipped
        return state

    def _patch(self, sample: int) -> np.ndarray:
        if self._patches is None:
            self._patches = np.memmap(self._patches_file, dtype=np.float16, mode="r", shape=self._shape)
        return np.asarray(self._patches[sample], dtype=np.float32)

    def __getitem__(self, item: int) -> dict:
        import torch

        patch = torch.from_numpy(self._patch(int(self.samples[item])))
        condition = str(self.conditions[item])
        if self.augment is None:
            image = A.centre_crop(patch, self.crop_px)
        else:
            jitter = self._jitter(int(item))
            image = A.adjust_intensity(A.affine_crop(patch, self.crop_px, jitter), jitter)
            if jitter.flip:
                image, condition = A.mirror_left_right(image, condition)
        image = A.resize(image, self.input_px).contiguous()
        return {"image": image, "condition": CONDITION_INDEX[condition], "label": int(self.labels[item]),
                "weight": float(self.weights[item]), "row": int(self.rows[item]), "level": int(self.levels[item])}


def make_loader(dataset: CropDataset, batch_size: int, shuffle: bool, num_workers: int = 0,
                device: str = "cpu", seed: int = 0, drop_last: bool = False):
    """DataLoader with the settings that matter: pinned memory on CUDA, persistent workers, seeded order."""
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      pin_memory=str(device).startswith("cuda"), persistent_workers=num_workers > 0,
                      generator=generator, drop_last=drop_last)
