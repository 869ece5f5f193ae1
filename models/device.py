"""Where models execute: one injected policy object (never an import-time global).

`memory` is the machine the policy runs on (RAM and VRAM totals, what is free now): the real one by default,
an `InjectedMachine` in tests and benchmarks that stand for another computer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from models.machine import RAM, VRAM, HostMemory, MachineMemory

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DevicePolicy:
    device: torch.device
    dtype: torch.dtype
    # Pinned RAM copies let RAM -> VRAM moves run as non-blocking DMA copies.
    pin_memory: bool
    # None: this computer, read live (HostMemory of the policy's GPU, or of no GPU).
    memory: MachineMemory | None = None

    def __post_init__(self) -> None:
        if self.memory is None:
            index = (self.device.index or 0) if self.device.type == "cuda" else None
            object.__setattr__(self, "memory", HostMemory(cuda_index=index))

    @classmethod
    def detect(cls, *, force_cpu: bool = False, memory: MachineMemory | None = None) -> DevicePolicy:
        if not force_cpu and torch.cuda.is_available():
            policy = cls(device=torch.device("cuda", 0), dtype=torch.float16, pin_memory=True, memory=memory)
            logger.info("device: %s (%s)", policy.device, torch.cuda.get_device_name(policy.device))
            return policy
        logger.info("device: cpu%s", " (forced)" if force_cpu else "")
        return cls.cpu(memory=memory)

    @classmethod
    def cpu(cls, *, memory: MachineMemory | None = None) -> DevicePolicy:
        # float16 matmuls on CPU are slow and lossy: CPU always computes in float32.
        return cls(device=torch.device("cpu"), dtype=torch.float32, pin_memory=False, memory=memory)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def machine(self) -> MachineMemory:
        assert self.memory is not None  # set in __post_init__
        return self.memory

    @property
    def has_vram(self) -> bool:
        """Jobs run out of device memory of their own: a GPU, or an injected machine's simulated card."""
        return self.is_cuda or self.machine.vram().total > 0

    @property
    def execution_tier(self) -> str:
        """The memory a job's weights and activations must fit in: "vram" with a card, else "ram"."""
        return VRAM if self.has_vram else RAM

    def generator(self, seed: int) -> torch.Generator:
        # A CPU generator gives the same noise on every device: a seed reproduces an image anywhere.
        return torch.Generator("cpu").manual_seed(int(seed))

    def vram_bytes(self) -> tuple[int, int]:
        """(free, total) bytes of the execution device's memory; (0, 0) on CPU."""
        reading = self.machine.vram()
        return (reading.available, reading.total)

    def ram_bytes(self) -> tuple[int, int]:
        """(available, total) bytes of system memory now."""
        reading = self.machine.ram()
        return (reading.available, reading.total)
