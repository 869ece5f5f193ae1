import torch

from models.device import DevicePolicy


def test_cpu_policy_computes_in_float32_without_pinning():
    policy = DevicePolicy.cpu()
    assert policy.device == torch.device("cpu")
    assert policy.dtype == torch.float32
    assert policy.pin_memory is False
    assert not policy.is_cuda
    assert policy.vram_bytes() == (0, 0)


def test_detect_forced_cpu_is_the_cpu_policy():
    assert DevicePolicy.detect(force_cpu=True) == DevicePolicy.cpu()


def test_detect_matches_the_machine():
    policy = DevicePolicy.detect()
    assert policy.is_cuda == torch.cuda.is_available()
    if policy.is_cuda:
        assert policy.dtype == torch.float16 and policy.pin_memory
        free, total = policy.vram_bytes()
        assert 0 < free <= total


def test_generator_is_a_seeded_cpu_generator():
    policy = DevicePolicy.cpu()
    g1, g2 = policy.generator(1234), policy.generator(1234)
    assert g1.device == torch.device("cpu")
    assert torch.equal(torch.randn(8, generator=g1), torch.randn(8, generator=g2))
    assert not torch.equal(
        torch.randn(8, generator=policy.generator(1)), torch.randn(8, generator=policy.generator(2))
    )


def test_policy_is_immutable():
    policy = DevicePolicy.cpu()
    try:
        policy.dtype = torch.float16  # type: ignore[misc]
    except AttributeError:
        return
    raise AssertionError("DevicePolicy must be frozen")
