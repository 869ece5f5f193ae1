"""Horde sampler names -> diffusers schedulers.

The horde speaks k-diffusion names (k_euler_a, k_dpmpp_2m ...) plus `karras` (the Karras sigma schedule).
Each maps onto a diffusers scheduler class and constructor kwargs; the scheduler is built per image with
`Cls.from_config(<the pipeline's original scheduler config>, **kwargs)`, so no job leaves state behind.

Where diffusers has no exact equivalent the nearest scheduler is used and a `Substitution` says so:

| horde          | diffusers                                          | exact?                          |
|----------------|----------------------------------------------------|---------------------------------|
| k_lms          | LMSDiscreteScheduler                               | yes                             |
| k_heun         | HeunDiscreteScheduler                              | yes                             |
| k_euler        | EulerDiscreteScheduler                             | yes                             |
| k_euler_a      | EulerAncestralDiscreteScheduler (Karras: below)    | yes                             |
| k_dpm_2        | KDPM2DiscreteScheduler                             | yes                             |
| k_dpm_2_a      | KDPM2AncestralDiscreteScheduler                    | yes                             |
| k_dpm_fast     | DPMSolverSinglestepScheduler order 3, dpmsolver    | nearest (1)                     |
| k_dpm_adaptive | DPMSolverSinglestepScheduler order 3, dpmsolver    | nearest (2)                     |
| k_dpmpp_2s_a   | DPMSolverSinglestepScheduler order 2, dpmsolver++  | nearest (3)                     |
| k_dpmpp_2m     | DPMSolverMultistepScheduler order 2, dpmsolver++   | yes                             |
| k_dpmpp_sde    | DPMSolverSDEScheduler (Brownian tree seeded/image) | yes                             |
| dpmsolver      | DPMSolverMultistepScheduler order 2, dpmsolver     | yes (original multistep solver) |
| DDIM           | DDIMScheduler                                      | yes; no Karras schedule (noted) |
| lcm            | LCMScheduler                                       | yes; no Karras schedule (noted) |

(1) DPM-Solver-fast is this singlestep solver with its own order mix and a log-sigma step schedule.
(2) A fixed ddim_steps instead of an error-controlled adaptive step count.
(3) The same 2S solver without ancestral noise (diffusers' docs name it the closest).

An unknown name runs as k_euler_a and is reported. diffusers' EulerAncestralDiscreteScheduler has no
`use_karras_sigmas`; because k_euler_a + karras is the horde's default request, it gets a small subclass
that puts the Karras sigmas (rho 7, as k-diffusion) into the ancestral sampler instead of a report.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from bridge.generation.substitutions import Substitution

logger = logging.getLogger(__name__)

FALLBACK_SAMPLER = "k_euler_a"
KARRAS_RHO = 7.0


class EulerAncestralKarrasScheduler(EulerAncestralDiscreteScheduler):
    """Euler ancestral on the Karras sigma schedule (what k-diffusion runs for k_euler_a + karras)."""

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device = None) -> None:
        super().set_timesteps(num_inference_steps, device)
        alphas = self.alphas_cumprod.numpy()
        log_sigmas = np.log(((1 - alphas) / alphas) ** 0.5)
        spaced = self.sigmas[:-1].numpy()
        ramp = np.linspace(0, 1, num_inference_steps)
        lo, hi = float(spaced[-1]) ** (1 / KARRAS_RHO), float(spaced[0]) ** (1 / KARRAS_RHO)
        sigmas = (hi + ramp * (lo - hi)) ** KARRAS_RHO
        timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas], dtype=np.float32)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps).to(device=device)


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    # Interpolate the training timestep whose sigma is `sigma` (log-linear between neighbours).
    log_sigma = np.log(max(sigma, 1e-10))
    low = int(np.clip(np.sum(log_sigmas <= log_sigma) - 1, 0, len(log_sigmas) - 2))
    w = np.clip((log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low]), 0, 1)
    return float(low + w)


@dataclass(frozen=True)
class SamplerEntry:
    scheduler: type[SchedulerMixin]
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Set where diffusers has no exact equivalent: why this scheduler is the nearest.
    nearest_note: str | None = None


# The first-order DPM-Solver ("dpmsolver", not "dpmsolver++") cannot step to sigma 0: diffusers refuses its
# default final_sigmas_type "zero" for it.
_DPMSOLVER_3 = {"solver_order": 3, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}

SAMPLERS: dict[str, SamplerEntry] = {
    "k_lms": SamplerEntry(LMSDiscreteScheduler),
    "k_heun": SamplerEntry(HeunDiscreteScheduler),
    "k_euler": SamplerEntry(EulerDiscreteScheduler),
    "k_euler_a": SamplerEntry(EulerAncestralDiscreteScheduler),
    "k_dpm_2": SamplerEntry(KDPM2DiscreteScheduler),
    "k_dpm_2_a": SamplerEntry(KDPM2AncestralDiscreteScheduler),
    "k_dpm_fast": SamplerEntry(
        DPMSolverSinglestepScheduler,
        _DPMSOLVER_3,
        "no DPM-Solver-fast in diffusers: ran singlestep DPM-Solver order 3",
    ),
    "k_dpm_adaptive": SamplerEntry(
        DPMSolverSinglestepScheduler,
        _DPMSOLVER_3,
        "no adaptive DPM-Solver in diffusers: ran singlestep DPM-Solver order 3 for ddim_steps steps",
    ),
    "k_dpmpp_2s_a": SamplerEntry(
        DPMSolverSinglestepScheduler,
        {"solver_order": 2, "algorithm_type": "dpmsolver++"},
        "no DPM++ 2S ancestral in diffusers: ran singlestep DPM++ 2S without ancestral noise",
    ),
    "k_dpmpp_2m": SamplerEntry(
        DPMSolverMultistepScheduler, {"solver_order": 2, "algorithm_type": "dpmsolver++"}
    ),
    "k_dpmpp_sde": SamplerEntry(DPMSolverSDEScheduler),
    "dpmsolver": SamplerEntry(DPMSolverMultistepScheduler, {**_DPMSOLVER_3, "solver_order": 2}),
    "ddim": SamplerEntry(DDIMScheduler),
    "lcm": SamplerEntry(LCMScheduler),
}
HORDE_SAMPLERS = (
    "k_lms", "k_heun", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a", "k_dpm_fast", "k_dpm_adaptive",
    "k_dpmpp_2s_a", "k_dpmpp_2m", "k_dpmpp_sde", "dpmsolver", "DDIM", "lcm",
)  # fmt: skip


@dataclass(frozen=True)
class SamplerChoice:
    """What a job runs: the horde name that was honoured, the scheduler class and its kwargs."""

    name: str
    karras: bool
    scheduler: type[SchedulerMixin]
    kwargs: tuple[tuple[str, Any], ...]
    # DPMSolverSDE draws its Brownian noise from its own seed: it must be the image's seed to reproduce.
    seeds_noise_sampler: bool = False

    def build(self, base_config: Any, seed: int) -> SchedulerMixin:
        """A fresh scheduler for one image, from the pipeline's original scheduler config."""
        kwargs = dict(self.kwargs)
        if self.seeds_noise_sampler:
            kwargs["noise_sampler_seed"] = seed
        return self.scheduler.from_config(base_config, **kwargs)


def _accepts(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.__init__).parameters


def resolve_sampler(asked: str | None, karras: bool) -> tuple[SamplerChoice, list[Substitution]]:
    """The scheduler for a horde sampler name and karras flag, plus a report of what was not honoured."""
    subs: list[Substitution] = []
    key = (asked or "").strip().lower()
    if key not in SAMPLERS:
        subs.append(Substitution("sampler_name", asked, FALLBACK_SAMPLER, "unknown sampler"))
        key = FALLBACK_SAMPLER
    entry = SAMPLERS[key]
    if entry.nearest_note:
        subs.append(Substitution("sampler_name", asked, entry.scheduler.__name__, entry.nearest_note))
    cls: type[SchedulerMixin] = entry.scheduler
    kwargs = dict(entry.kwargs)
    use_karras = False
    if _accepts(cls, "use_karras_sigmas"):
        # Always explicit: a model's shipped scheduler config may carry its own choice.
        kwargs["use_karras_sigmas"] = use_karras = karras
    elif karras and cls is EulerAncestralDiscreteScheduler:
        cls, use_karras = EulerAncestralKarrasScheduler, True
    elif karras:
        subs.append(Substitution("karras", True, False, f"{cls.__name__} has no Karras sigma schedule"))
    choice = SamplerChoice(
        name=key,
        karras=use_karras,
        scheduler=cls,
        kwargs=tuple(sorted(kwargs.items())),
        seeds_noise_sampler=cls is DPMSolverSDEScheduler,
    )
    return choice, subs
