"""Loading Stable Diffusion pipelines from disk through diffusers, never reaching a hub.

Single-file checkpoints (`.safetensors`, `.ckpt`) load with `from_single_file(config=<folder>)`, the folder
being the record's own (`diffusers_config`, as the tiny models ship) or one of the component-config folders
shipped in `models/configs/`, chosen from the record (baseline, inpainting, style, ldm yaml) and the
checkpoint itself (UNet input channels, text-encoder keys). Diffusers folders load with `from_pretrained`.
Everything loads into RAM in the policy's dtype; the cache moves it to the execution device.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import logging
import pickle
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import torch

from models.device import DevicePolicy
from models.twins import PICKLE_SUFFIXES, usable_twin, write_twin

if TYPE_CHECKING:
    from models.records import ModelRecord

logger = logging.getLogger(__name__)

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
# open_clip's copy (MIT) of the CLIP BPE merges: the vocabulary of every SD text encoder derives from it.
BPE_VOCAB = CONFIGS_DIR / "clip-tokenizer" / "bpe_simple_vocab_16e6.txt.gz"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
FAMILIES = ("sd1", "sd1-inpainting", "sd2", "sd2-v", "sd2-inpainting", "sd2-depth", "sdxl", "sdxl-inpainting")

_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
_SDXL_KEY = "conditioner.embedders.1.model.positional_embedding"
_OPEN_CLIP_KEY = "cond_stage_model.model.token_embedding.weight"
_WEIGHT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")


class ModelLoadError(RuntimeError):
    """A model's files cannot be turned into a pipeline (unsupported kind, missing component, bad file)."""


class UnsafeCheckpointError(ModelLoadError):
    """A `.ckpt` pickle holds more than tensors (code): refused, never unpickled."""


# --- tokenizer ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP BPE vocabulary (49408 tokens) and merges, derived as CLIP itself derives them."""
    from models.tiny import bytes_to_unicode

    lines = gzip.decompress(BPE_VOCAB.read_bytes()).decode("utf-8").split("\n")
    # The first line is a header; CLIP keeps the first 48894 merges so that the vocabulary is 49408.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def clip_tokenizer(tokenizer_dir: Path) -> Any:
    """A CLIPTokenizer from the shipped BPE and the folder's tokenizer_config.json (pad token, length)."""
    from transformers import CLIPTokenizer

    settings = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    vocab, merges = clip_bpe()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=settings.get("unk_token", "<|endoftext|>"),
        bos_token=settings.get("bos_token", "<|startoftext|>"),
        eos_token=settings.get("eos_token", "<|endoftext|>"),
        pad_token=settings.get("pad_token", "<|endoftext|>"),
        model_max_length=settings.get("model_max_length", 77),
    )


# --- reading checkpoints --------------------------------------------------------------------------------


def load_ckpt_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A `.ckpt`'s tensors, read with the restricted unpickler (models/ckpt_pickle.py): Lightning training
    checkpoints load, a pickle naming anything that could run code is refused before it is looked up."""
    from models import ckpt_pickle

    restricted = {"map_location": "cpu", "weights_only": False, "pickle_module": ckpt_pickle}
    try:
        try:
            loaded = torch.load(path, mmap=True, **restricted)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # The pre-zip (legacy) format cannot be memory-mapped.
            loaded = torch.load(path, **restricted)
    except ckpt_pickle.ForbiddenGlobal as exc:
        raise UnsafeCheckpointError(
            f"{path.name} was refused: its pickle names {exc.global_name}, which a checkpoint never needs "
            "(unpickling it could run code); nothing in it was run"
        ) from exc
    except (pickle.UnpicklingError, EOFError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path.name} is not a readable checkpoint: {str(exc).splitlines()[0]}") from exc
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ModelLoadError(f"{path.name} holds a {type(loaded).__name__}, not a state dict")
    return {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


@dataclass(frozen=True)
class CheckpointInfo:
    """What a single-file checkpoint says about itself."""

    in_channels: int | None
    arch: str | None  # "sd1", "sd2", "sdxl" from the text-encoder keys; None when unrecognised
    parameters: int  # elements of the weights a pipeline loads (EMA copies and the like excluded)


def _info(shapes: dict[str, tuple[int, ...]]) -> CheckpointInfo:
    in_shape = shapes.get(_UNET_IN)
    if _SDXL_KEY in shapes:
        arch: str | None = "sdxl"
    elif _OPEN_CLIP_KEY in shapes:
        arch = "sd2"
    elif any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        arch = "sd1"
    else:
        arch = None
    count = 0
    for key, shape in shapes.items():
        if key.startswith(_WEIGHT_PREFIXES):
            count += int(torch.Size(shape).numel())
    return CheckpointInfo(in_channels=in_shape[1] if in_shape else None, arch=arch, parameters=count)


def read_checkpoint_info(path: Path) -> CheckpointInfo:
    """Inspect a checkpoint cheaply: the safetensors header, or a memory-mapped weights-only `.ckpt`."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
    else:
        shapes = {k: tuple(v.shape) for k, v in load_ckpt_state_dict(path).items() if hasattr(v, "shape")}
    return _info(shapes)


# --- choosing how to load -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadPlan:
    name: str
    kind: str  # "single_file" or "folder"
    path: Path  # the checkpoint file, or the diffusers folder
    config_dir: Path | None  # single files: the component-config folder
    shipped_config: bool  # True when config_dir is one of models/configs/
    family: str | None  # the shipped family chosen (single files)
    parameters: int | None  # weights to load, when known before loading
    # A pickled checkpoint (.ckpt) read through its .safetensors twin: the file the reference names.
    source: Path | None = None

    def estimated_bytes(self, dtype: torch.dtype) -> int | None:
        """RAM the loaded pipeline will take, to make room before loading."""
        if self.parameters is None:
            return None
        return self.parameters * torch.empty((), dtype=dtype).element_size()


def _baseline_arch(record: ModelRecord) -> str:
    baseline = (record.baseline or "").lower()
    if baseline in ("stable_diffusion_xl", "stable diffusion xl"):
        return "sdxl"
    if baseline == "stable diffusion 2":
        return "sd2"
    if baseline in ("stable diffusion 1", ""):
        return "sd1"
    raise ModelLoadError(f"model {record.name!r}: baseline {record.baseline!r} is not supported")


def _sd2_v_prediction(record: ModelRecord) -> bool:
    # The horde lists the ldm yaml beside SD2 checkpoints: v2-inference-v.yaml (768-v) or v2-inference.yaml.
    yamls = [
        PurePosixPath(f.path).name.lower() for f in record.files if f.path.lower().endswith((".yaml", ".yml"))
    ]
    if yamls:
        return any(name.endswith("-v.yaml") or name.endswith("-v.yml") for name in yamls)
    return True  # every SD2 checkpoint of the horde's reference is a 768 v-prediction model


def select_family(record: ModelRecord, info: CheckpointInfo) -> str:
    """The shipped config family for a single-file checkpoint; the checkpoint's own shapes win over the
    record when they disagree (a mislabelled inpainting model still needs a 9-channel UNet)."""
    arch = _baseline_arch(record)
    if info.arch is not None and info.arch != arch:
        logger.warning(
            "model %r: baseline says %s, checkpoint looks %s; using the checkpoint",
            record.name,
            arch,
            info.arch,
        )
        arch = info.arch
    style = (record.style or "").lower()
    if info.in_channels is not None:
        inpainting, depth = info.in_channels == 9, info.in_channels == 5
        if inpainting != (record.inpainting or style == "inpainting"):
            logger.warning(
                "model %r: UNet has %d input channels; record says inpainting=%s",
                record.name,
                info.in_channels,
                record.inpainting,
            )
    else:
        inpainting, depth = record.inpainting or style == "inpainting", style == "depth2img"
    if arch == "sdxl":
        return "sdxl-inpainting" if inpainting else "sdxl"
    if arch == "sd2":
        if depth:
            return "sd2-depth"
        if inpainting:
            return "sd2-inpainting"
        return "sd2-v" if _sd2_v_prediction(record) else "sd2"
    if depth:
        raise ModelLoadError(f"model {record.name!r}: depth2img needs a Stable Diffusion 2 checkpoint")
    return "sd1-inpainting" if inpainting else "sd1"


def _folder_parameters(folder: Path) -> int | None:
    from safetensors import safe_open

    total = 0
    for path in folder.rglob("*.safetensors"):
        with safe_open(str(path), framework="pt") as fh:
            total += sum(int(torch.Size(fh.get_slice(k).get_shape()).numel()) for k in fh.keys())  # noqa: SIM118
    return total or None


def inside(files_dir: Path, relative: str | PurePosixPath) -> Path:
    """`files_dir / relative`, refused unless it stays inside `files_dir`: a reference (a file from the
    internet) must not point the loader at the rest of the disk. Checked on the path's text, not by resolving
    it: an operator may keep the model folder's files as symlinks to another disk."""
    rel = PurePosixPath(str(relative))
    if rel.is_absolute() or ".." in rel.parts or str(relative).startswith("~"):
        raise ModelLoadError(f"reference path {str(relative)!r} points outside the model folder")
    return files_dir / rel


def plan_load(record: ModelRecord, files_dir: Path) -> LoadPlan:
    """Decide how to load `record` whose verified files are under `files_dir`."""
    files_dir = Path(files_dir)
    own_config = record.extra.get("diffusers_config")
    paths = [PurePosixPath(f.path) for f in record.files]
    # A single file's own config folder lists a model_index.json too; it is not a diffusers model.
    config_prefix = PurePosixPath(str(own_config)) if own_config else None
    index = next(
        (p for p in paths if p.name == "model_index.json" and p.parent != config_prefix),
        None,
    )
    if index is not None or (not paths and (files_dir / "model_index.json").is_file()):
        folder = inside(files_dir, index.parent) if index is not None else files_dir
        return LoadPlan(record.name, "folder", folder, None, False, None, _folder_parameters(folder))
    checkpoint = next((p for p in paths if p.suffix.lower() in CHECKPOINT_SUFFIXES), None)
    if checkpoint is None:
        raise ModelLoadError(f"model {record.name!r}: no checkpoint or diffusers folder among its files")
    # Local custom records may name a checkpoint anywhere (the operator's own disk); reference ones may not.
    path = files_dir / checkpoint if record.base_dir is not None else inside(files_dir, checkpoint)
    source = None
    if path.suffix.lower() in PICKLE_SUFFIXES:
        twin = usable_twin(path, checkpoint_sha256(record, path))
        if twin is not None:
            path, source = twin, path
    info = read_checkpoint_info(path)
    family = select_family(record, info)
    if own_config:
        config_dir, shipped = inside(files_dir, str(own_config)), False
    else:
        config_dir, shipped = CONFIGS_DIR / family, True
    return LoadPlan(
        record.name, "single_file", path, config_dir, shipped, family, info.parameters or None, source
    )


def checkpoint_sha256(record: ModelRecord, path: Path) -> str:
    """The sha256 the reference gives for the checkpoint, else the file's own (cached in its sidecar)."""
    for spec in record.files:
        if spec.sha256sum and PurePosixPath(spec.path).name == path.name:
            return spec.sha256sum
    from models.downloads import file_sha256

    return file_sha256(path)


# --- loading --------------------------------------------------------------------------------------------


def _pipeline_class(config_dir: Path) -> type:
    import diffusers

    name = json.loads((config_dir / "model_index.json").read_text(encoding="utf-8"))["_class_name"]
    return getattr(diffusers, name)


def _from_single_file(cls: type) -> Any:
    """`cls.from_single_file`; pipelines without the mixin (depth2img) use the mixin's generic code,
    which builds any pipeline class from its model_index.json."""
    if hasattr(cls, "from_single_file"):
        return cls.from_single_file
    from diffusers.loaders import FromSingleFileMixin

    return functools.partial(FromSingleFileMixin.from_single_file.__func__, cls)  # type: ignore[attr-defined]


def _single_file_components(
    plan: LoadPlan, depth_estimator_dir: Path | None, dtype: torch.dtype
) -> dict[str, Any]:
    """Components a checkpoint does not hold: tokenizers (shipped configs) and the depth estimator."""
    assert plan.config_dir is not None
    extra: dict[str, Any] = {}
    if plan.shipped_config:
        for sub in ("tokenizer", "tokenizer_2"):
            if (plan.config_dir / sub).is_dir():
                extra[sub] = clip_tokenizer(plan.config_dir / sub)
    if plan.family == "sd2-depth" and (plan.shipped_config or depth_estimator_dir is not None):
        if depth_estimator_dir is None or not (Path(depth_estimator_dir) / "config.json").is_file():
            raise ModelLoadError(
                f"model {plan.name!r}: a single-file depth2img checkpoint does not carry a loadable depth "
                "estimator; give a DPT folder (transformers DPTForDepthEstimation, e.g. dpt-hybrid-midas) "
                "as depth_estimator_dir"
            )
        from transformers import DPTForDepthEstimation

        extra["depth_estimator"] = DPTForDepthEstimation.from_pretrained(
            depth_estimator_dir, local_files_only=True, dtype=dtype
        )
    return extra


def load_pipeline(
    record: ModelRecord,
    files_dir: Path,
    device: DevicePolicy,
    *,
    plan: LoadPlan | None = None,
    depth_estimator_dir: Path | None = None,
) -> Any:
    """The record's DiffusionPipeline in RAM, in the policy's dtype, loaded without any hub access."""
    plan = plan or plan_load(record, files_dir)
    state: dict[str, torch.Tensor] | None = None
    if plan.kind == "folder":
        pipe = _load_folder(plan.path, device.dtype)
    else:
        assert plan.config_dir is not None
        cls = _pipeline_class(plan.config_dir)
        logger.info(
            "loading %s from %s (%s, config %s)",
            record.name,
            plan.path.name,
            cls.__name__,
            plan.config_dir.name,
        )
        if plan.path.suffix.lower() != ".safetensors":
            # Unpickled here, restricted; diffusers only ever sees the tensors.
            state = load_ckpt_state_dict(plan.path)
        with _checkpoint_source(plan.path, state):
            pipe = _from_single_file(cls)(
                str(plan.path),
                config=str(plan.config_dir),
                local_files_only=True,
                dtype=device.dtype,
                **_single_file_components(plan, depth_estimator_dir, device.dtype),
            )
    _check_complete(pipe, record.name)
    if state is not None:
        write_twin(plan.path, state, checkpoint_sha256(record, plan.path), _WEIGHT_PREFIXES)
        del state
    # A worker's log is no place for per-step progress bars.
    pipe.set_progress_bar_config(disable=True)
    _prefault(pipe)
    return pipe


_checkpoint_lock = threading.Lock()


@contextlib.contextmanager
def _checkpoint_source(path: Path, state: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Let diffusers' single-file loader take `state` for `path` instead of reading the file itself (its own
    reader would unpickle a .ckpt with weights_only=True, which refuses Lightning checkpoints)."""
    if state is None:
        yield
        return
    import diffusers.loaders.single_file as single_file

    original = getattr(single_file, "load_single_file_checkpoint", None)
    if original is None:
        raise ModelLoadError("this diffusers version has no single-file checkpoint loader to hand tensors to")

    def load_single_file_checkpoint(link_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(link_or_path) == str(path):
            return state
        return original(link_or_path, *args, **kwargs)

    with _checkpoint_lock:
        single_file.load_single_file_checkpoint = load_single_file_checkpoint
        try:
            yield
        finally:
            single_file.load_single_file_checkpoint = original


def _check_complete(pipe: Any, name: str) -> None:
    """diffusers leaves a weight it found no value for on the meta device, silently: refuse such a model."""
    from models.cache import torch_modules

    for component, module in torch_modules(pipe).items():
        missing = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if missing:
            raise ModelLoadError(
                f"model {name!r}: the checkpoint has no weights for {len(missing)} tensors of {component} "
                f"(first: {missing[0]}); wrong config family or a partial checkpoint"
            )


def _prefault(pipe: Any) -> None:
    """safetensors weights arrive memory-mapped and are read lazily: read every page now, so that a model
    the cache holds is in RAM (and the first job does not pay for the disk)."""
    from models.cache import torch_modules

    with torch.no_grad():
        for module in torch_modules(pipe).values():
            for t in [*module.parameters(), *module.buffers()]:
                if t.device.type == "cpu" and t.numel() and t.is_contiguous():
                    step = max(1, 4096 // t.element_size())  # one element per 4 KiB page
                    t.reshape(-1)[::step].sum()


def _load_folder(folder: Path, dtype: torch.dtype) -> Any:
    from diffusers import DiffusionPipeline

    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype}
    if index.get("safety_checker") not in (None, [None, None]):
        # The bridge runs its own NSFW check; the pipeline's own checker would only cost memory.
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    logger.info("loading %s (%s, diffusers folder)", folder.name, index.get("_class_name"))
    return DiffusionPipeline.from_pretrained(str(folder), **kwargs)
