"""Face fixers: GFPGAN (v1.4, and v1.3 as "GFPGANv1.3"), CodeFormer and RestoreFormer.

facexlib's FaceRestoreHelper does what the legacy worker's GFPGANer / CodeFormer app did around the network:
RetinaFace (ResNet-50) detection, alignment of each face to the FFHQ 512² template, and paste-back through a
ParseNet face mask. The restorer networks load through spandrel (+ spandrel_extra_arches for CodeFormer),
never through gfpgan / basicsr / codeformer-pip (see postprocessors/README.md).

`facefixer_strength` (0..1): CodeFormer's fidelity weight w (0 = strongest restoration, 1 = closest to the
input; upstream default 0.5); for GFPGAN and RestoreFormer, which have no such weight, the blend of their
result over the input image (default 1: the network's own output, which is what the legacy worker returned).
GFPGANv1.3 is the same network as v1.4 (GFPGANv1Clean) with other weights; RestoreFormer (the release in
TencentARC/GFPGAN v1.3.4) is a VQ transformer that spandrel loads, run on the same aligned 512² crops.
"""

from __future__ import annotations

import abc
import logging
import threading
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from models.cache import ModelCache
from models.device import DevicePolicy
from models.interrupt import NEVER, Interrupt
from postprocessors.base import (
    PostProcessError,
    PostProcessor,
    PostProcessResult,
    checked_image,
    information,
    join_alpha,
    module_device_dtype,
    split_alpha,
)
from postprocessors.loading import SpandrelModel, load_spandrel

logger = logging.getLogger(__name__)

DETECTOR_MODEL = "retinaface_resnet50"
FACE_HELPER_FILES = ("detection_Resnet50_Final.pth", "parsing_parsenet.pth")
FACE_HELPER_KEY = "postprocessor:facexlib"
FACE_SIZE = 512
# Detection runs on a copy at most this short side (CodeFormer's app does the same): RetinaFace's cost grows
# with the pixels, and faces small enough to vanish at 640 px are too small to restore anyway.
DETECT_SHORT_SIDE = 640
EYE_DIST_THRESHOLD = 5  # px: drops side views and specks, as GFPGANer does


def find_face_helper_folder(candidates: list[Path]) -> Path | None:
    """The first folder holding both facexlib weight files (facexlib downloads any it does not find)."""
    for folder in candidates:
        if all((folder / name).is_file() for name in FACE_HELPER_FILES):
            return folder
    return None


class FaceHelper:
    """facexlib's FaceRestoreHelper (detector + face parser) as one cacheable object.

    The helper keeps per-image state in lists, so it serves one image at a time (`lock`).
    """

    def __init__(self, folder: Path) -> None:
        from facexlib.utils.face_restoration_helper import FaceRestoreHelper

        missing = [name for name in FACE_HELPER_FILES if not (folder / name).is_file()]
        if missing:  # facexlib would start a download: refuse instead
            raise PostProcessError(
                f"face helper weights missing in {folder}: {missing}", reason="missing_weights"
            )
        self.helper = FaceRestoreHelper(
            1,
            face_size=FACE_SIZE,
            crop_ratio=(1, 1),
            det_model=DETECTOR_MODEL,
            save_ext="png",
            use_parse=True,
            device=torch.device("cpu"),
            model_rootpath=str(folder),
        )
        self.lock = threading.Lock()

    def torch_modules(self) -> dict[str, torch.nn.Module]:
        return {"detector": self.helper.face_det, "parser": self.helper.face_parse}

    def begin(self, bgr: np.ndarray) -> Any:
        """Reset the helper for a new image (call with `lock` held); returns the helper."""
        # The cache moves weights by swapping tensor data, so the device attributes facexlib keeps must be
        # re-read from the weights each time.
        detector = self.helper.face_det
        device = next(detector.parameters()).device
        self.helper.device = device
        detector.device = device
        # RetinaFace keeps its mean as a plain tensor attribute, which no module move touches.
        detector.mean_tensor = detector.mean_tensor.to(device)
        self.helper.clean_all()
        self.helper.read_image(bgr)
        return self.helper

    def detect(self, bgr: np.ndarray) -> list[np.ndarray]:
        """5-point landmarks (5x2, x/y pixels) of every face found; call with `lock` held."""
        helper = self.begin(bgr)
        short_side = min(bgr.shape[:2])
        helper.get_face_landmarks_5(
            only_center_face=False,
            resize=DETECT_SHORT_SIDE if short_side > DETECT_SHORT_SIDE else None,
            eye_dist_threshold=EYE_DIST_THRESHOLD,
        )
        found = [np.asarray(landmarks, dtype=np.float32) for landmarks in helper.all_landmarks_5]
        helper.clean_all()
        return found


def _strength(value: float | None, default: float) -> float:
    if value is None:
        return default
    try:
        return min(1.0, max(0.0, float(value)))
    except (TypeError, ValueError) as exc:
        raise PostProcessError(
            f"facefixer_strength must be a number, not {value!r}", reason="bad_value"
        ) from exc


def _crop_to_tensor(crop_bgr: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Aligned uint8 BGR face -> (1, 3, 512, 512) RGB tensor in [-1, 1], the restorers' input range."""
    rgb = torch.from_numpy(np.ascontiguousarray(crop_bgr[:, :, ::-1])).permute(2, 0, 1).unsqueeze(0)
    return rgb.to(device=device, dtype=dtype).div_(127.5).sub_(1.0)


def _tensor_to_crop(tensor: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) RGB tensor in [-1, 1] -> uint8 BGR face."""
    rgb = tensor[0].float().clamp_(-1, 1).add_(1.0).mul_(127.5).round_().to(torch.uint8)
    return np.ascontiguousarray(rgb.permute(1, 2, 0).cpu().numpy()[:, :, ::-1])


class FaceFixer(PostProcessor):
    category: ClassVar[str]
    file_name: ClassVar[str]
    architecture: ClassVar[str]
    default_strength: ClassVar[float]

    def __init__(
        self, *, weights: Path, face_helper_dirs: list[Path], cache: ModelCache, device: DevicePolicy
    ) -> None:
        self.weights = weights
        self.face_helper_dirs = face_helper_dirs
        self._cache = cache
        self._device = device

    @property
    def cache_key(self) -> str:
        return f"postprocessor:{self.name}"

    def files(self) -> list[Path]:
        folder = find_face_helper_folder(self.face_helper_dirs) or self.face_helper_dirs[0]
        return [self.weights, *(folder / name for name in FACE_HELPER_FILES)]

    @abc.abstractmethod
    def restore_face(self, model: SpandrelModel, crop_bgr: np.ndarray, strength: float) -> np.ndarray:
        """One aligned 512² BGR face in, the restored face out (same shape, uint8)."""

    def process(
        self, image: Image.Image, *, strength: float | None = None, interrupt: Interrupt = NEVER
    ) -> PostProcessResult:
        image = checked_image(image, name=self.name)
        value = _strength(strength, self.default_strength)
        rgb, _ = split_alpha(image)
        bgr = np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])
        with self._use_helper() as helper, helper.lock:
            landmarks = helper.detect(bgr)
        if not landmarks:
            logger.info("%s: no face found in %dx%d: image unchanged", self.name, *image.size)
            return PostProcessResult(image, [information(f"{self.name}: no face found, image unchanged")])
        return self._restore(image, landmarks, value, interrupt)

    def restore_faces(
        self, image: Image.Image, landmarks: list[np.ndarray], *, strength: float | None = None,
        interrupt: Interrupt = NEVER,
    ) -> PostProcessResult:  # fmt: skip
        """Restore the faces at known 5-point landmarks (eyes, nose, mouth corners as x/y pixels), skipping
        detection: for callers that already know where the faces are (and for tests)."""
        image = checked_image(image, name=self.name)
        points = [np.asarray(p, dtype=np.float32).reshape(5, 2) for p in landmarks]
        return self._restore(image, points, _strength(strength, self.default_strength), interrupt)

    def _restore(
        self, image: Image.Image, landmarks: list[np.ndarray], strength: float, interrupt: Interrupt = NEVER
    ) -> PostProcessResult:
        rgb, alpha = split_alpha(image)
        bgr = np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])
        with self._use_helper() as face, self._use_restorer() as model, face.lock:
            helper = face.begin(bgr)
            helper.all_landmarks_5 = list(landmarks)
            helper.align_warp_face()
            for number, crop in enumerate(helper.cropped_faces, start=1):
                # An interrupted image leaves the helper half-done: `begin` resets it for the next one.
                interrupt.check(f"{self.name}, face {number} of {len(helper.cropped_faces)}")
                helper.add_restored_face(self.restore_face(model, crop, strength))
            helper.get_inverse_affine(None)
            pasted = helper.paste_faces_to_input_image()
            helper.clean_all()
        logger.info("%s: restored %d face(s) at strength %.2f", self.name, len(landmarks), strength)
        restored = Image.fromarray(np.ascontiguousarray(pasted[:, :, ::-1]), "RGB")
        return PostProcessResult(join_alpha(self.blend(rgb, restored, strength), alpha))

    def blend(self, original: Image.Image, restored: Image.Image, strength: float) -> Image.Image:
        """The final image from the input and the pasted restoration (GFPGAN mixes them by strength)."""
        return restored

    def _use_helper(self) -> AbstractContextManager[FaceHelper]:
        folder = find_face_helper_folder(self.face_helper_dirs)
        if folder is None:
            raise PostProcessError(
                f"{self.name}: face helper weights {list(FACE_HELPER_FILES)} not found in "
                f"{[str(d) for d in self.face_helper_dirs]}",
                reason="missing_weights",
            )
        return self._cache.use(FACE_HELPER_KEY, lambda: FaceHelper(folder))

    def _use_restorer(self) -> AbstractContextManager[SpandrelModel]:
        hint = self.weights.stat().st_size if self.weights.exists() else None
        loader = lambda: load_spandrel(self.weights, architecture=self.architecture)  # noqa: E731
        return self._cache.use(self.cache_key, loader, size_hint=hint)


class BlendedFaceFixer(FaceFixer):
    """A restorer without a fidelity weight: strength blends its full output over the input."""

    default_strength = 1.0

    def blend(self, original: Image.Image, restored: Image.Image, strength: float) -> Image.Image:
        # Blending whole images (not face crops) keeps strength 0 exactly the input, and makes the pasted
        # result a straight mix of the input and the network's full-strength output.
        return restored if strength >= 1.0 else Image.blend(original, restored, strength)


class Gfpgan(BlendedFaceFixer):
    name = "GFPGAN"
    category = "gfpgan"
    file_name = "GFPGANv1.4.pth"
    architecture = "GFPGAN"

    @torch.inference_mode()
    def restore_face(self, model: SpandrelModel, crop_bgr: np.ndarray, strength: float) -> np.ndarray:
        device, dtype = module_device_dtype(model.module)
        face = _crop_to_tensor(crop_bgr, device, dtype)
        # Fixed noise buffers instead of fresh noise: the same image restores the same way every time.
        return _tensor_to_crop(model.module(face, return_rgb=False, randomize_noise=False)[0])


class GfpganV13(Gfpgan):
    name = "GFPGANv1.3"
    file_name = "GFPGANv1.3.pth"


class RestoreFormer(BlendedFaceFixer):
    name = "RestoreFormer"
    category = "gfpgan"  # released with GFPGAN (v1.3.4); it shares GFPGAN's face helper files
    file_name = "RestoreFormer.pth"
    architecture = "RestoreFormer"

    @torch.inference_mode()
    def restore_face(self, model: SpandrelModel, crop_bgr: np.ndarray, strength: float) -> np.ndarray:
        device, dtype = module_device_dtype(model.module)
        face = _crop_to_tensor(crop_bgr, device, dtype)
        restored, _ = model.module(face)  # (image in [-1, 1], quantisation loss: None at inference)
        return _tensor_to_crop(restored)


class CodeFormer(FaceFixer):
    name = "CodeFormers"
    category = "codeformer"
    file_name = "CodeFormers.pth"
    architecture = "CodeFormer"
    default_strength = 0.5

    @torch.inference_mode()
    def restore_face(self, model: SpandrelModel, crop_bgr: np.ndarray, strength: float) -> np.ndarray:
        device, dtype = module_device_dtype(model.module)
        face = _crop_to_tensor(crop_bgr, device, dtype)
        return _tensor_to_crop(model.module(face, weight=strength)[0])


FACE_FIXERS: tuple[type[FaceFixer], ...] = (Gfpgan, CodeFormer, GfpganV13, RestoreFormer)
