"""How much memory a job needs besides its weights, per device: a small table kept beside the model cache.

A diffusion job's peak is, apart from the weights, the larger of the denoising pass (the UNet on a batch of
two latents for classifier-free guidance) and the VAE decode at full resolution; both grow with the pixels
of one image, because every image of a batch is generated on its own. Measured on a 2-core CPU with an
SD1.5-shaped model in float32 (bench/first_start.py, RSS peak above the loaded model): the UNet pass adds
~0.2-0.3 GiB at 256²-512², the VAE decode 0.23 / 0.53 / 0.94 GiB at 256² / 384² / 512², i.e. ~3,800 bytes per
pixel. float16 halves the activations. On CUDA the runner decodes in tiles above 768x768, which caps the
decode term there. SDXL shares SD's VAE; its UNet is larger (the denoise term is set higher).

The table starts from these figures and is then measured on the device itself: the first job of a family
that runs alone with its model already loaded sets that family's scale from its real peak (CUDA: the
allocator's peak; CPU: the process's peak RSS), later jobs only raise it. It is saved as
`<cache_home>/working-memory.json`, keyed by device and dtype, so the measurement happens once per device.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from models.device import DevicePolicy
from models.machine import process_rss

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
GIB = 1024 * MIB
TABLE_FILE = "working-memory.json"
# Measured peaks are kept with this much headroom: the next job's prompt or sampler may need a little more.
MEASURED_MARGIN = 1.2
# Only a job at least this large replaces the default scale: below it the fixed part dominates and says
# little about the per-pixel part that sets max_pixels. Smaller jobs can still raise the estimate.
REPRESENTATIVE_PIXELS = 384 * 384
# The runner's CUDA VAE tiling threshold (bridge/generation/runner.py VAE_TILING_PIXELS): above it the decode
# works tile by tile and stops growing with the image.
CUDA_DECODE_CAP_PIXELS = 768 * 768


@dataclass
class FamilyCoefficients:
    """Bytes at float32 (halved for 2-byte dtypes); `scale` is what measuring on this device found."""

    fixed: int  # any size: text encoding, scheduler state, allocator slack
    denoise_per_pixel: float  # the UNet pass, per pixel of one image
    decode_per_pixel: float  # the VAE decode, per pixel of one image
    scale: float = 1.0
    measured: bool = False


def default_coefficients() -> dict[str, FamilyCoefficients]:
    return {
        "sd": FamilyCoefficients(fixed=384 * MIB, denoise_per_pixel=1_200, decode_per_pixel=3_900),
        "sdxl": FamilyCoefficients(fixed=1 * GIB, denoise_per_pixel=2_400, decode_per_pixel=3_900),
    }


# Working memory of each post-processor kind at float32 (tile-bounded: see postprocessors/upscalers.py, whose
# measured x4 tile of 256 px adds ~1.0 GB), plus the images they hold: input, output.
POST_PROCESSOR_BYTES = {"upscaler": 1_200 * MIB, "face_fixer": 800 * MIB, "strip_background": 512 * MIB}
INTERROGATOR_BYTES = {"caption": 768 * MIB, "interrogation": 384 * MIB, "nsfw": 256 * MIB,
                      "aesthetic": 256 * MIB}  # fmt: skip


def family_of(baseline: str | None) -> str:
    """The working-memory family of a model reference baseline."""
    return "sdxl" if (baseline or "").lower() in ("stable_diffusion_xl", "stable diffusion xl") else "sd"


def dtype_factor(dtype: torch.dtype) -> float:
    """Activation bytes relative to float32."""
    return torch.empty((), dtype=dtype).element_size() / 4


@dataclass(frozen=True)
class JobShape:
    """What a generation job's working memory depends on."""

    family: str
    width: int
    height: int
    batch: int = 1
    hires_fix: bool = False
    post_processors: tuple[str, ...] = ()

    @property
    def pixels(self) -> int:
        return self.width * self.height


class WorkingMemoryTable:
    def __init__(self, device: DevicePolicy, path: Path | None = None) -> None:
        self.device = device
        self.path = path
        self.key = f"{device.machine.name()}|{str(device.dtype).removeprefix('torch.')}"
        self._factor = dtype_factor(device.dtype)
        self._families = default_coefficients()
        self._lock = threading.Lock()
        self._load()

    # --- estimates ----------------------------------------------------------------------------------------

    def diffusion_bytes(self, family: str, pixels: int) -> int:
        """Working memory of one image's denoising and decode at `pixels`."""
        c = self._families.get(family, self._families["sd"])
        decoded = min(pixels, CUDA_DECODE_CAP_PIXELS) if self.device.is_cuda else pixels
        term = max(c.denoise_per_pixel * pixels, c.decode_per_pixel * decoded)
        return int((c.fixed + term) * self._factor * c.scale)

    def job_bytes(self, shape: JobShape) -> int:
        """The job's working memory at its peak: the diffusion pass, plus the finished images it keeps (RGB
        bytes; with hires fix the first-pass images too)."""
        images = shape.batch * shape.pixels * 3 * (2 if shape.hires_fix else 1)
        return self.diffusion_bytes(shape.family, shape.pixels) + images

    def post_processor_bytes(self, kind: str, pixels: int, scale: int = 1) -> int:
        """A post-processor's working memory on an image of `pixels` (input, output, tile activations)."""
        images = pixels * 3 * (1 + scale * scale) + pixels * 3 * 4  # uint8 in and out, the float input tensor
        return int(POST_PROCESSOR_BYTES.get(kind, POST_PROCESSOR_BYTES["upscaler"]) * self._factor) + images

    def interrogator_bytes(self, form: str) -> int:
        return int(INTERROGATOR_BYTES.get(form, 512 * MIB) * self._factor)

    def largest_pixels(self, family: str, room: int, step: int = 64 * 64, limit: int = 8192 * 8192) -> int:
        """The most pixels (a multiple of `step`) whose one-image job fits in `room` bytes; 0 if none."""
        low, high = 0, limit // step
        while low < high:
            mid = (low + high + 1) // 2
            if self.job_bytes(JobShape(family, mid * step, 1)) <= room:
                low = mid
            else:
                high = mid - 1
        return low * step

    # --- measuring ----------------------------------------------------------------------------------------

    def observe(self, family: str, pixels: int, peak_bytes: int) -> None:
        """A job of `family` at `pixels` really needed `peak_bytes` besides its weights."""
        if pixels <= 0 or peak_bytes <= 0:
            return
        with self._lock:
            c = self._families.setdefault(family, default_coefficients()["sd"])
            unscaled = self.diffusion_bytes(family, pixels) / c.scale
            wanted = peak_bytes * MEASURED_MARGIN / unscaled
            # The first representative measurement on this device replaces the default; others only raise.
            replace = not c.measured and pixels >= REPRESENTATIVE_PIXELS
            if not replace and wanted <= c.scale:
                return
            before = c.scale
            c.scale = wanted if replace else max(c.scale, wanted)
            c.measured = c.measured or replace
            logger.info(
                "working memory of %s jobs on %s: %.2f GiB measured at %d px; estimates x%.2f (was x%.2f)",
                family, self.key, peak_bytes / GIB, pixels, c.scale, before,
            )  # fmt: skip
            self._save()

    def coefficients(self, family: str) -> FamilyCoefficients:
        with self._lock:
            c = self._families.get(family, self._families["sd"])
            return FamilyCoefficients(**asdict(c))

    def _load(self) -> None:
        if self.path is None or not self.path.is_file():
            return
        try:
            saved = json.loads(self.path.read_text(encoding="utf-8")).get(self.key, {})
            for family, values in saved.items():
                if family in self._families:
                    self._families[family].scale = float(values["scale"])
                    self._families[family].measured = bool(values.get("measured", False))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.warning("working-memory table %s unreadable (%s): using the defaults", self.path, exc)

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            everything = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        except (OSError, ValueError):
            everything = {}
        everything[self.key] = {
            family: {"scale": c.scale, "measured": c.measured} for family, c in self._families.items()
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(everything, indent=1), encoding="utf-8")
            tmp.replace(self.path)
        except OSError as exc:
            logger.warning("could not save the working-memory table %s: %s", self.path, exc)


class PeakMeter:
    """Peak memory of this process above the start of a block: the CUDA allocator's peak, or on a CPU the
    process's peak resident set (Linux VmHWM, reset at the start)."""

    def __init__(self, device: DevicePolicy) -> None:
        self.device = device
        self.start = 0
        self.peak = 0
        self.ok = False

    def __enter__(self) -> PeakMeter:
        if self.device.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device.device)
            self.start = torch.cuda.memory_allocated(self.device.device)
            self.ok = True
        else:
            self.ok = _reset_peak_rss()
            self.start = process_rss()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.is_cuda:
            self.peak = torch.cuda.max_memory_allocated(self.device.device)
        elif self.ok:
            self.peak = _peak_rss()
            self.ok = self.peak > 0

    @property
    def used(self) -> int:
        return max(0, self.peak - self.start) if self.ok else 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")  # 5: reset the peak resident set size to the current one
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def folder_weight_bytes(folder: Path, dtype: torch.dtype) -> int:
    """Bytes the weights of a model folder take in `dtype`, from the safetensors headers (other weight files
    by their size)."""
    from safetensors import safe_open

    element = torch.empty((), dtype=dtype).element_size()
    total = 0
    for path in Path(folder).rglob("*"):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as fh:
                count = sum(int(torch.Size(fh.get_slice(k).get_shape()).numel()) for k in fh.keys())  # noqa: SIM118
            total += count * element
        elif path.suffix in (".bin", ".pth", ".pt", ".ckpt"):
            total += int(path.stat().st_size * element / 4)  # such files hold float32 weights
    return total


def file_weight_bytes(path: Path, dtype: torch.dtype) -> int:
    """A float32 weight file's weights in `dtype` (post-processor .pth files)."""
    try:
        size = Path(path).stat().st_size
    except OSError:
        return 0
    return int(size * torch.empty((), dtype=dtype).element_size() / 4)
