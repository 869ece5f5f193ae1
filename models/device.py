"""Where models execute: one injected policy object (never an import-time global)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DevicePolicy:
    device: torch.device
    dtype: torch.dtype
    # Pinned RAM copies let RAM -> VRAM moves run as non-blocking DMA copies.
    pin_memory: bool

    @classmethod
    def detect(cls, *, force_cpu: bool = False) -> DevicePolicy:
        if not force_cpu and torch.cuda.is_available():
            policy = cls(device=torch.device("cuda", 0), dtype=torch.float16, pin_memory=True)
            logger.info("device: %s (%s)", policy.device, torch.cuda.get_device_name(policy.device))
            return policy
        logger.info("device: cpu%s", " (forced)" if force_cpu else "")
        return cls.cpu()

    @classmethod
    def cpu(cls) -> DevicePolicy:
        # float16 matmuls on CPU are slow and lossy: CPU always computes in float32.
        return cls(device=torch.device("cpu"), dtype=torch.float32, pin_memory=False)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def generator(self, seed: int) -> torch.Generator:
        # A CPU generator gives the same noise on every device: a seed reproduces an image anywhere.
        return torch.Generator("cpu").manual_seed(int(seed))

    def vram_bytes(self) -> tuple[int, int]:
        """(free, total) bytes of the execution device's memory; (0, 0) on CPU."""
        if not self.is_cuda:
            return (0, 0)
        free, total = torch.cuda.mem_get_info(self.device)
        return (int(free), int(total))
