"""Every horde sampler, with and without karras: the scheduler it maps to, what is reported, and a real
denoising run on the tiny pipeline."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)

from bridge.api_models import GenerationPayload
from bridge.generation.masks import SourceImages
from bridge.generation.request import SourceKind, WorkerLimits, build_request
from bridge.generation.runner import generate
from bridge.generation.samplers import (
    HORDE_SAMPLERS,
    EulerAncestralKarrasScheduler,
    resolve_sampler,
)

NEAREST = {"k_dpm_fast", "k_dpm_adaptive", "k_dpmpp_2s_a"}
NO_KARRAS = {"DDIM", "lcm"}


@pytest.mark.parametrize("name", HORDE_SAMPLERS)
@pytest.mark.parametrize("karras", [False, True])
def test_every_sampler_maps_and_reports_exactly_what_it_cannot_honour(name: str, karras: bool) -> None:
    choice, subs = resolve_sampler(name, karras)
    reported = [s.field for s in subs]
    assert reported.count("sampler_name") == (1 if name in NEAREST else 0)
    assert reported.count("karras") == (1 if karras and name in NO_KARRAS else 0)
    assert choice.karras == (karras and name not in NO_KARRAS)
    assert choice.name == name.lower()


def test_specific_mappings() -> None:
    assert resolve_sampler("k_euler", True)[0].scheduler is EulerDiscreteScheduler
    assert dict(resolve_sampler("k_euler", True)[0].kwargs) == {"use_karras_sigmas": True}
    assert dict(resolve_sampler("k_euler", False)[0].kwargs) == {"use_karras_sigmas": False}
    assert resolve_sampler("k_euler_a", False)[0].scheduler is EulerAncestralDiscreteScheduler
    assert resolve_sampler("k_euler_a", True)[0].scheduler is EulerAncestralKarrasScheduler
    m2 = resolve_sampler("k_dpmpp_2m", True)[0]
    assert m2.scheduler is DPMSolverMultistepScheduler and dict(m2.kwargs)["algorithm_type"] == "dpmsolver++"
    assert dict(resolve_sampler("dpmsolver", False)[0].kwargs)["algorithm_type"] == "dpmsolver"
    assert resolve_sampler("k_dpmpp_2s_a", False)[0].scheduler is DPMSolverSinglestepScheduler
    assert resolve_sampler("DDIM", True)[0].scheduler is DDIMScheduler
    assert resolve_sampler("lcm", False)[0].scheduler is LCMScheduler
    sde = resolve_sampler("k_dpmpp_sde", False)[0]
    assert sde.scheduler is DPMSolverSDEScheduler and sde.seeds_noise_sampler


@pytest.mark.parametrize("name", ["plms", "", None, "k_euler_b"])
def test_unknown_sampler_falls_back_to_k_euler_a_with_a_note(name: str | None) -> None:
    choice, subs = resolve_sampler(name, False)
    assert choice.scheduler is EulerAncestralDiscreteScheduler
    assert subs[0].field == "sampler_name" and subs[0].used == "k_euler_a" and "unknown" in subs[0].why


def test_euler_ancestral_karras_uses_the_karras_schedule() -> None:
    base = EulerAncestralDiscreteScheduler()
    plain, karras = (
        EulerAncestralDiscreteScheduler.from_config(base.config),
        EulerAncestralKarrasScheduler.from_config(base.config),
    )
    plain.set_timesteps(10)
    karras.set_timesteps(10)
    sigmas = karras.sigmas.numpy()
    assert sigmas[0] == pytest.approx(plain.sigmas[0].item(), rel=1e-5)
    assert sigmas[-2] == pytest.approx(plain.sigmas[-2].item(), rel=1e-5)
    assert sigmas[-1] == 0.0 and np.all(np.diff(sigmas) < 0)
    rho = 7.0
    ramp = np.linspace(0, 1, 10)
    lo, hi = sigmas[-2] ** (1 / rho), sigmas[0] ** (1 / rho)
    np.testing.assert_allclose(sigmas[:-1], (hi + ramp * (lo - hi)) ** rho, rtol=1e-5)
    # diffusers' own Karras Euler (same schedule, no ancestral noise): same sigmas, same timesteps.
    reference = EulerDiscreteScheduler.from_config(base.config, use_karras_sigmas=True)
    reference.set_timesteps(10)
    np.testing.assert_allclose(sigmas, reference.sigmas.numpy(), rtol=1e-5)
    np.testing.assert_allclose(karras.timesteps.numpy(), reference.timesteps.numpy(), rtol=1e-4, atol=1e-3)
    assert len(karras.timesteps) == 10


@pytest.mark.parametrize("name", HORDE_SAMPLERS)
def test_every_sampler_denoises_on_the_tiny_pipeline(name: str, runtime, pipelines) -> None:
    images = {}
    for karras in (False, True):
        payload = GenerationPayload(
            prompt="a cat", seed=7, width=64, height=64, ddim_steps=3, sampler_name=name
        )
        payload = payload.model_copy(update={"karras": karras})
        request, _ = build_request(
            payload, pipelines.record("tiny-sd1-diffusers"), SourceKind(), WorkerLimits(512 * 512)
        )
        [image] = generate(runtime, request, SourceImages(), [])
        pixels = np.asarray(image)
        assert image.size == (64, 64) and pixels.std() > 0
        images[karras] = pixels
    if name not in NO_KARRAS:
        # The Karras schedule changes the noise levels, hence the image (two steps would only hit the
        # end points, which both schedules share).
        assert not np.array_equal(images[False], images[True])
