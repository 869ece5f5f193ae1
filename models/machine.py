"""How much RAM and VRAM the machine has and how much is free now, behind one small protocol.

`HostMemory` reads this computer (psutil, the CUDA driver) every time it is asked, so every decision made from
it follows the machine as other programs start and stop. `InjectedMachine` stands for another computer (an
8 GB card, a 16 GB CPU-only box, a 64 GB server) so that tests and benchmarks run the worker's memory
decisions for that machine here: its totals are given, "other programs" use what the test says, and what
this process holds is either its real resident set (benchmarks) or a ledger kept by the model cache (tests).
A simulated card refuses an allocation beyond its total exactly as a real one does (torch.OutOfMemoryError).

The model cache reaches all of this through `DevicePolicy.memory`; nothing else reads psutil or the driver.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Protocol

import torch

RAM = "ram"
VRAM = "vram"
GIB = 1024**3


@dataclass(frozen=True)
class MemoryReading:
    """One tier of memory now: its size, and what nobody (this process included) uses."""

    total: int
    available: int


class MachineMemory(Protocol):
    def ram(self) -> MemoryReading:
        """System memory now."""
        ...

    def vram(self) -> MemoryReading:
        """The execution device's memory now; (0, 0) on a machine without a GPU."""
        ...

    def account(self, tier: str, nbytes: int) -> None:
        """This process now holds `nbytes` more of `tier` (less when negative). A real machine sees its
        allocations itself and ignores this; an injected one keeps its ledger with it."""
        ...

    def name(self) -> str:
        """What kind of device this is, to key measurements kept per device ("cpu", "cuda:<model>")."""
        ...


@dataclass(frozen=True)
class HostMemory:
    """This computer. `cuda_index` is the GPU that runs jobs, None when jobs run on the CPU."""

    cuda_index: int | None = None

    def ram(self) -> MemoryReading:
        import psutil

        vm = psutil.virtual_memory()
        return MemoryReading(total=int(vm.total), available=int(vm.available))

    def vram(self) -> MemoryReading:
        if self.cuda_index is None or not torch.cuda.is_available():
            return MemoryReading(0, 0)
        free, total = torch.cuda.mem_get_info(self.cuda_index)
        # Blocks torch's allocator keeps for reuse look used to the driver but are free to this process.
        idle = torch.cuda.memory_reserved(self.cuda_index) - torch.cuda.memory_allocated(self.cuda_index)
        return MemoryReading(total=int(total), available=int(free) + max(0, int(idle)))

    def account(self, tier: str, nbytes: int) -> None:
        return None

    def name(self) -> str:
        if self.cuda_index is None:
            return "cpu"
        return f"cuda:{torch.cuda.get_device_name(self.cuda_index)}"


def process_rss() -> int:
    """This process's resident set now (Linux /proc; 0 where unreadable)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class InjectedMachine:
    """Another machine, simulated on this one for tests and benchmarks.

    `ram_others` / `vram_others`: bytes used by the operating system and other programs (the rest of a
    16 GB desktop). With `ram_from_rss` this process's RAM is its real resident set (a benchmark loading
    real-shape models on this computer); otherwise it is the ledger the model cache keeps through `account`.
    VRAM is always the ledger: there is no card here, the cache's bookkeeping is what the card would hold.
    """

    def __init__(
        self,
        *,
        ram_total: int,
        vram_total: int = 0,
        ram_others: int = 0,
        vram_others: int = 0,
        ram_from_rss: bool = False,
        label: str | None = None,
    ) -> None:
        if ram_total <= 0 or vram_total < 0:
            raise ValueError("an injected machine needs some RAM and no negative VRAM")
        self.ram_total, self.vram_total = int(ram_total), int(vram_total)
        self.ram_others, self.vram_others = int(ram_others), int(vram_others)
        self.ram_from_rss = ram_from_rss
        self.label = label or f"injected {ram_total / GIB:g} GiB RAM" + (
            f" + {vram_total / GIB:g} GiB card" if vram_total else ""
        )
        self._ledger = {RAM: 0, VRAM: 0}
        self._lock = threading.Lock()

    @classmethod
    def gib(cls, ram: float, vram: float = 0, *, ram_others: float = 0, vram_others: float = 0,
            ram_from_rss: bool = False) -> InjectedMachine:  # fmt: skip
        return cls(ram_total=int(ram * GIB), vram_total=int(vram * GIB), ram_others=int(ram_others * GIB),
                   vram_others=int(vram_others * GIB), ram_from_rss=ram_from_rss)  # fmt: skip

    def ram(self) -> MemoryReading:
        ours = process_rss() if self.ram_from_rss else self._ledger[RAM]
        return MemoryReading(self.ram_total, max(0, self.ram_total - self.ram_others - ours))

    def vram(self) -> MemoryReading:
        if not self.vram_total:
            return MemoryReading(0, 0)
        return MemoryReading(self.vram_total, max(0, self.vram_total - self.vram_others - self._ledger[VRAM]))

    def held(self, tier: str) -> int:
        """What the ledger says this process holds in `tier`."""
        return self._ledger[tier]

    def account(self, tier: str, nbytes: int) -> None:
        if tier == RAM and self.ram_from_rss:
            return
        with self._lock:
            after = self._ledger[tier] + int(nbytes)
            if tier == RAM:
                total, others = self.ram_total, self.ram_others
            else:
                total, others = self.vram_total, self.vram_others
            if nbytes > 0 and others + after > total:
                # What the real device does when asked for more than it has.
                used = others + after - nbytes
                message = f"injected {tier}: {nbytes} more bytes do not fit ({used} of {total} used)"
                if tier == VRAM:
                    raise torch.OutOfMemoryError(message)
                raise MemoryError(message)
            self._ledger[tier] = max(0, after)

    def set_others(self, *, ram: int | None = None, vram: int | None = None) -> None:
        """Other programs grew or shrank (a browser opened, a game started on the card)."""
        if ram is not None:
            self.ram_others = int(ram)
        if vram is not None:
            self.vram_others = int(vram)

    def name(self) -> str:
        return self.label

    def __repr__(self) -> str:
        return f"InjectedMachine({self.label})"
