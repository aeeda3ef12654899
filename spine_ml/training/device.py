"""Where and in which precision a trial runs, and how it seeds itself.

bf16 autocast on CUDA only: CPU bf16 autocast is slow on most CPUs and changes results, so on CPU a
trial always runs fp32 (and is then deterministic for `train.seed`).
"""
from __future__ import annotations

import contextlib
import logging
import random
from typing import TYPE_CHECKING

import numpy as np
import torch

from spine_ml.cpus import available_cpus
from spine_ml.errors import UserError

if TYPE_CHECKING:
    from spine_ml.config import TrainConfig

log = logging.getLogger(__name__)


class DeviceError(UserError):
    """A device setting this machine cannot honour."""


def resolve_device(train_cfg: TrainConfig) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if train_cfg.device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("train.device: cuda requested but no CUDA device is available; use train.device=auto or cpu")
    if train_cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(train_cfg.device)


def use_bf16(train_cfg: TrainConfig, device: torch.device) -> bool:
    if device.type != "cuda":
        if train_cfg.precision == "bf16":
            log.warning("train.precision: bf16 autocast is used on CUDA only; running fp32 on %s", device)
        return False
    return train_cfg.precision in ("auto", "bf16")


def autocast(device: torch.device, bf16: bool):
    """The forward-pass precision context: bf16 autocast on CUDA, nothing otherwise."""
    if bf16 and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cap_threads() -> int:
    """Keep torch's intra-op threads within the CPUs this process may use.

    A caller that already chose (Ray sets OMP_NUM_THREADS per trial from its resources; tests set
    it too) is left alone; only a count above the CPUs at hand is lowered, because oversubscribed
    threads slow every trial on the machine.
    """
    cpus = available_cpus()
    if torch.get_num_threads() > cpus:
        torch.set_num_threads(cpus)
    return torch.get_num_threads()


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; returns a torch generator for the data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator
