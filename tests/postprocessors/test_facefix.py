"""Face fixers on the real facexlib helper and spandrel networks (random weights).

The tiny detector has all-zero weights, so detection always runs and never finds a face (a random detector
would find dozens in noise and take minutes); the restore path is driven with known landmarks instead.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from models.interrupt import Interrupt, Interrupted
from postprocessors import PostProcessError, PostProcessorRegistry
from postprocessors.facefix import FACE_HELPER_KEY, FaceFixer
from tests.models.test_interrupt import ticking
from tests.postprocessors.helpers import face_landmarks, picture

FACE_SCALE, FACE_OFFSET = 0.25, (24.0, 20.0)  # a 128 px face whose aligned box is x 24..152, y 20..148
SIZE = (200, 190)


@pytest.fixture(scope="module")
def face_image() -> Image.Image:
    return picture(SIZE, seed=3)


def _diff(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max(axis=-1)


@pytest.mark.parametrize("name", ["GFPGAN", "CodeFormers"])
def test_no_face_leaves_the_image_unchanged_with_a_note(registry: PostProcessorRegistry, name: str) -> None:
    image = picture((64, 48))
    result = registry.get(name).process(image, strength=0.8)
    assert result.image.size == image.size and result.image.mode == "RGB"
    assert np.array_equal(np.asarray(result.image), np.asarray(image))
    assert result.metadata == [
        {"type": "information", "value": "see_ref", "ref": f"{name}: no face found, image unchanged"}
    ]


def test_no_face_keeps_alpha(registry: PostProcessorRegistry) -> None:
    image = picture((48, 40), mode="RGBA")
    result = registry.get("CodeFormers").process(image)
    assert result.image.mode == "RGBA"
    assert np.array_equal(np.asarray(result.image), np.asarray(image))


def test_gfpgan_restores_the_aligned_face_and_blends_by_strength(
    registry: PostProcessorRegistry, face_image: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One full-size GFPGAN pass (seconds on CPU): the face is restored in place, then mixed with the input
    by the strength."""
    fixer = registry.get("GFPGAN")
    blends: list[tuple[Image.Image, float]] = []
    real_blend = fixer.blend

    def record(original: Image.Image, restored: Image.Image, strength: float) -> Image.Image:
        blends.append((restored, strength))
        return real_blend(original, restored, strength)

    monkeypatch.setattr(fixer, "blend", record)
    result = fixer.restore_faces(face_image, [face_landmarks(FACE_SCALE, FACE_OFFSET)], strength=0.5)

    ((full, strength),) = blends
    assert strength == 0.5
    assert full.size == result.image.size == face_image.size and result.image.mode == "RGB"
    diff = _diff(full, face_image)
    assert (diff[20:148, 24:152] > 0).mean() > 0.2  # the face region was replaced
    # Outside the aligned face box the paste-back mask is zero: those pixels are untouched.
    assert (diff[:, 160:] == 0).all() and (diff[156:, :] == 0).all()
    expected = (np.asarray(face_image, dtype=float) + np.asarray(full, dtype=float)) / 2
    assert np.abs(np.asarray(result.image, dtype=float) - expected).max() <= 1.0


def test_gfpgan_default_strength_is_its_own_output(registry: PostProcessorRegistry) -> None:
    fixer = registry.get("GFPGAN")
    assert fixer.default_strength == 1.0
    before, after = picture((8, 8)), picture((8, 8), seed=4)
    assert fixer.blend(before, after, 1.0) is after
    assert np.array_equal(np.asarray(fixer.blend(before, after, 0.0)), np.asarray(before))


def test_codeformer_restores_and_keeps_alpha(registry: PostProcessorRegistry) -> None:
    image = picture(SIZE, mode="RGBA", seed=5)
    alpha = np.asarray(image.getchannel("A")).copy()
    alpha[:10] = 0
    image.putalpha(Image.fromarray(alpha, "L"))
    result = registry.get("CodeFormers").restore_faces(image, [face_landmarks(FACE_SCALE, FACE_OFFSET)])
    assert result.image.mode == "RGBA" and result.image.size == image.size
    assert np.array_equal(np.asarray(result.image.getchannel("A")), alpha)
    diff = _diff(result.image.convert("RGB"), image.convert("RGB"))
    assert (diff[20:148, 24:152] > 0).mean() > 0.2
    assert (diff[:, 160:] == 0).all()


class _Reached(Exception):
    pass


@pytest.mark.parametrize(("strength", "expected"), [(0.3, 0.3), (None, 0.5), (7.0, 1.0)])
def test_codeformer_gets_strength_as_fidelity_weight(
    registry: PostProcessorRegistry, face_image: Image.Image, strength: float | None, expected: float
) -> None:
    """The strength reaches CodeFormer's forward call as w (clamped to 0..1; None -> upstream 0.5)."""
    fixer: FaceFixer = registry.get("CodeFormers")
    seen: list[float] = []

    def stop_at_forward(module, args, kwargs):
        seen.append(kwargs["weight"])
        raise _Reached  # the value is what this test is about: skip the 10 s forward pass

    with fixer._use_restorer() as model:
        handle = model.module.register_forward_pre_hook(stop_at_forward, with_kwargs=True)
    try:
        with pytest.raises(_Reached):
            fixer.restore_faces(face_image, [face_landmarks(FACE_SCALE, FACE_OFFSET)], strength=strength)
    finally:
        handle.remove()
    assert seen == [expected]


def test_strength_must_be_a_number(registry: PostProcessorRegistry, face_image: Image.Image) -> None:
    with pytest.raises(PostProcessError, match="facefixer_strength"):
        registry.get("GFPGAN").process(face_image, strength="strong")  # type: ignore[arg-type]


def test_missing_face_helper_weights_raise(tmp_path, weights_dir, cache) -> None:
    from tests.postprocessors.helpers import tiny_registry

    (tmp_path / "gfpgan").mkdir()
    (tmp_path / "gfpgan" / "GFPGANv1.4.pth").symlink_to(weights_dir / "gfpgan" / "GFPGANv1.4.pth")
    registry = tiny_registry(tmp_path, cache)
    assert "GFPGAN" not in registry.available()
    with pytest.raises(PostProcessError, match="face helper weights") as info:
        registry.get("GFPGAN").process(picture())
    assert info.value.reason == "missing_weights"


def test_past_the_deadline_no_further_face_is_restored_and_the_helper_is_free(
    registry: PostProcessorRegistry, face_image: Image.Image
) -> None:
    fixer = registry.get("CodeFormers")
    faces = [face_landmarks(FACE_SCALE, FACE_OFFSET), face_landmarks(FACE_SCALE, (40.0, 30.0))]
    with pytest.raises(Interrupted, match="during CodeFormers, face 1 of 2: stopped unfinished"):
        fixer.restore_faces(face_image, faces, interrupt=Interrupt(deadline=0, clock=ticking()))
    entries = fixer._cache._entries
    assert entries[FACE_HELPER_KEY].locks == entries[fixer.cache_key].locks == 0
    with fixer._use_helper() as helper:
        assert helper.lock.acquire(timeout=1)  # the next image gets the face helper
        helper.lock.release()
