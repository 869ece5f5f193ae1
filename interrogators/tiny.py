"""Tiny random-weight interrogation models for tests, the demo and offline checks.

The folders have the exact layout of the real transformers-format repos (config.json, weights, processor and
tokenizer files), so they go through the very loaders the real models use. Tokenizers are built from
hand-written vocabularies because no hub can be reached. Building is idempotent: an existing folder with
the same recipe is kept, so a session-scoped fixture costs one build per machine.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from interrogators.reference import model_dir
from models.tiny import bytes_to_unicode

logger = logging.getLogger(__name__)

# Bump when the recipe changes so that stale folders are rebuilt.
RECIPE_VERSION = "1"
IMAGE_SIZE = 32
HIDDEN = 32

TINY_CAPTION = "tiny-blip"
TINY_CLIP = "tiny-clip"
TINY_SAFETY = "tiny-safety-checker"
TINY_SAFETY_FLAGS = "tiny-safety-checker-flags"
# A CLIP that embeds every image to one vector, in the first half of its projection, and every text in the
# second half: every similarity is 0, so the safety pass finds nothing in any image, and a test places each
# concept at the similarity it wants by writing the concept embeddings (tests/interrogators/safety_helpers).
TINY_SPLIT_CLIP = "tiny-clip-split"
TINY_DEEPDANBOORU = "tiny-deepdanbooru"
TINY_AESTHETIC = "tiny-aesthetic"
# `build_worker(interrogator_models=...)` for demo and benchmark workers: their generation safety pass runs
# on the split CLIP, so random-weight images are never flagged at random (the pass itself is the real one).
TINY_SAFETY_PASS = {
    "safety_clip_model": TINY_SPLIT_CLIP,
    "danbooru_model": TINY_DEEPDANBOORU,
    "aesthetic_model": TINY_AESTHETIC,
}
# DeepDanbooru's channel widths divided by this (the layout, the names and the strides are the real ones).
DEEPDANBOORU_DIVISOR = 32
DEEPDANBOORU_TAGS = ("1girl", "solo", "bikini", "realistic", "nude", "rating:safe", "rating:questionable",
                     "rating:explicit")  # fmt: skip
# Classifier weight per tag: features are non-negative (after a ReLU), so a positive row drives the
# probability towards 1, a negative one towards 0, and 0 gives 0.5. The default model rates everything safe.
SAFE_LEANING = {"rating:safe": 1.0, "rating:questionable": -1.0, "rating:explicit": -1.0, "bikini": -1.0,
                "realistic": -1.0}  # fmt: skip

_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "with",
    "on",
    "in",
    "at",
    "and",
    "photo",
    "painting",
    "drawing",
    "picture",
    "image",
    "portrait",
    "landscape",
    "city",
    "street",
    "cat",
    "dog",
    "bird",
    "horse",
    "man",
    "woman",
    "child",
    "people",
    "tree",
    "trees",
    "flower",
    "flowers",
    "house",
    "car",
    "boat",
    "sky",
    "cloud",
    "clouds",
    "sun",
    "moon",
    "night",
    "day",
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "dark",
    "bright",
    "old",
    "new",
    "small",
    "large",
    "sitting",
    "standing",
    "walking",
    "near",
    "under",
    "over",
    "water",
    "river",
    "sea",
    "mountain",
    "forest",
    "field",
    "road",
    "room",
    "table",
    "window",
]


def _write_bert_vocab(folder: Path) -> Path:
    """A WordPiece vocab: specials, whole words, single letters and their continuations (so any word
    tokenizes), with [DEC] as BLIP's decoder start token."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = _BERT_SPECIALS + _WORDS + letters + [f"##{c}" for c in letters] + [".", ","]
    path = folder / "vocab.txt"
    path.write_text("\n".join(dict.fromkeys(tokens)) + "\n", encoding="utf-8")
    return path


def _write_clip_vocab(folder: Path) -> tuple[Path, Path, int, int, int]:
    """vocab.json + merges.txt for a byte-level CLIPTokenizer. Returns paths, vocab size, bos and eos ids."""
    chars = list(bytes_to_unicode().values())
    merges = [("t", "h"), ("th", "e</w>"), ("a", "r"), ("i", "n"), ("o", "n</w>")]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab), encoding="utf-8")
    merges_path.write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
    )
    return vocab_path, merges_path, len(vocab), vocab["<|startoftext|>"], vocab["<|endoftext|>"]


def _small_vision() -> dict[str, Any]:
    return {
        "hidden_size": HIDDEN,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
    }


def _clip_image_processor() -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )


def _clip_config(vocab_size: int, bos: int, eos: int) -> Any:
    from transformers import CLIPConfig

    text = {
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": eos,
    }
    return CLIPConfig(text_config=text, vision_config=_small_vision(), projection_dim=HIDDEN)


def _build_blip(folder: Path) -> None:
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    vocab = _write_bert_vocab(folder)
    tokenizer = BertTokenizer(str(vocab), do_lower_case=True, bos_token="[DEC]")
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "encoder_hidden_size": HIDDEN,
        "max_position_embeddings": 128,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.convert_tokens_to_ids("[DEC]"),
        "sep_token_id": tokenizer.sep_token_id,
        "eos_token_id": tokenizer.sep_token_id,
    }
    config = BlipConfig(text_config=text, vision_config=_small_vision(), projection_dim=HIDDEN)
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).eval().save_pretrained(folder)
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def _build_clip(folder: Path) -> None:
    import torch
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab, merges, size, bos, eos = _write_clip_vocab(folder)
    tokenizer = CLIPTokenizer(str(vocab), str(merges))
    torch.manual_seed(1)
    CLIPModel(_clip_config(size, bos, eos)).eval().save_pretrained(folder)
    CLIPProcessor(image_processor=_clip_image_processor(), tokenizer=tokenizer).save_pretrained(folder)


def _build_safety(folder: Path, *, flags: bool) -> None:
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    torch.manual_seed(2)
    checker = StableDiffusionSafetyChecker(_clip_config(64, 0, 1)).eval()
    if flags:
        # score = cosine - weight: a weight of -1 makes every concept score positive, so every image flags.
        with torch.no_grad():
            checker.concept_embeds_weights.fill_(-1.0)
    checker.save_pretrained(folder)
    _clip_image_processor().save_pretrained(folder)


def _build_split_clip(folder: Path) -> None:
    import torch
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab, merges, size, bos, eos = _write_clip_vocab(folder)
    tokenizer = CLIPTokenizer(str(vocab), str(merges))
    torch.manual_seed(3)
    model = CLIPModel(_clip_config(size, bos, eos)).eval()
    half = HIDDEN // 2
    with torch.no_grad():  # projection rows are output dimensions
        model.visual_projection.weight[half:] = 0.0
        model.text_projection.weight[:half] = 0.0
        # The pooled image feature is the final layer norm's output: with no scale it is its bias, whatever
        # the image.
        model.vision_model.post_layernorm.weight.zero_()
        model.vision_model.post_layernorm.bias.uniform_(0.5, 1.0)
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=_clip_image_processor(), tokenizer=tokenizer).save_pretrained(folder)


def deepdanbooru_shapes(divisor: int = 1, tag_count: int = 9176) -> dict[int, tuple[int, int, int]]:
    """Conv number -> (out, in, kernel) of DeepDanbooru resnet_custom_v3, widths divided by `divisor`."""
    from interrogators.deepdanbooru import CONV_COUNT, _layout

    stem, widths = 64 // divisor, [w // divisor for w in (64, 128, 256, 256, 512, 1024)]
    shapes = {0: (stem, 3, 7)}
    channels, stage, blocks = stem, -1, _layout()
    for block in blocks:
        if block.projection is not None:
            stage += 1
            shapes[block.projection] = (4 * widths[stage], channels, 1)
        width = widths[stage]
        shapes[block.a] = (width, channels, 1)
        shapes[block.b] = (width, width, 3)
        shapes[block.c] = (4 * width, width, 1)
        channels = 4 * width
    shapes[CONV_COUNT - 1] = (tag_count, channels, 1)
    return shapes


def write_deepdanbooru(
    path: Path,
    leaning: dict[str, float] | None = None,
    *,
    divisor: int = DEEPDANBOORU_DIVISOR,
    tags: tuple[str, ...] = DEEPDANBOORU_TAGS,
    seed: int = 4,
) -> Path:
    """A random-weight DeepDanbooru file in the real layout (a dict of `n_Conv_*` tensors and `tags`).
    `leaning`: tag -> sign of its classifier row (default: everything rated safe)."""
    import torch

    from interrogators.deepdanbooru import CONV_COUNT, DeepDanbooru

    torch.manual_seed(seed)
    model = DeepDanbooru(deepdanbooru_shapes(divisor, len(tags)), list(tags))
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):  # He init keeps activations alive through 60 blocks
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            torch.nn.init.normal_(module.weight, std=(2.0 / fan_in) ** 0.5)
            if module.bias is not None:
                torch.nn.init.constant_(module.bias, 0.01)
    classifier = model.conv(CONV_COUNT - 1)
    with torch.no_grad():
        classifier.weight.zero_()
        for tag, weight in (SAFE_LEANING if leaning is None else leaning).items():
            classifier.weight[tags.index(tag)] = 10.0 * weight
    state: dict[str, Any] = dict(model.state_dict())
    state["tags"] = list(tags)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def write_aesthetic(path: Path, input_width: int = HIDDEN, *, seed: int = 5) -> Path:
    """A random-weight aesthetic predictor in the real layout (a state dict, `layers.0` ... `layers.7`)."""
    import torch

    from interrogators.aesthetic import AestheticHead

    torch.manual_seed(seed)
    head = AestheticHead(input_width)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(head.state_dict(), path)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _record(name: str, kind: str, folder: Path) -> dict[str, Any]:
    """A horde-shaped reference record; download URLs are local file URLs since nothing is hosted."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != ".recipe")
    return {
        "name": name,
        "type": kind,
        "category": kind,
        "description": f"tiny random-weight {kind} model for tests",
        "version": RECIPE_VERSION,
        # Paths relative to the category folder, as in interrogators/reference.json.
        "config": {
            "files": [{"path": f"{name}/{p.name}", "sha256sum": _sha256(p)} for p in files],
            "download": [
                {"file_name": p.name, "file_path": name, "file_url": p.resolve().as_uri()} for p in files
            ],
        },
        "available": True,
    }


def build_tiny_interrogators(dest: Path) -> dict[str, dict[str, Any]]:
    """Build (once) tiny BLIP, CLIP, two SD safety checkers (one never flags, one always flags) and the
    safety pass's models (a split CLIP, DeepDanbooru, the aesthetic predictor) under `dest` in the layout
    `build_interrogators` reads, and return their reference records by name."""
    builders: list[tuple[str, str, Callable[[Path], None]]] = [
        (TINY_CAPTION, "blip", _build_blip),
        (TINY_CLIP, "clip", _build_clip),
        (TINY_SAFETY, "safety_checker", lambda f: _build_safety(f, flags=False)),
        (TINY_SAFETY_FLAGS, "safety_checker", lambda f: _build_safety(f, flags=True)),
        (TINY_SPLIT_CLIP, "clip", _build_split_clip),
        (TINY_DEEPDANBOORU, "deepdanbooru", lambda f: write_deepdanbooru(f / "model-resnet_custom_v3.pt")),
        (TINY_AESTHETIC, "aesthetic", lambda f: write_aesthetic(f / "sac+logos+ava1-l14-linearMSE.pth")),
    ]
    records: dict[str, dict[str, Any]] = {}
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    # Several processes (test sessions, the demo) may build into one folder: one builds, the others reuse.
    with (dest / ".interrogators-build.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name, kind, build in builders:
            folder = model_dir(dest, kind, name)
            marker = folder / ".recipe"
            if not (marker.exists() and marker.read_text() == RECIPE_VERSION):
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                logger.info("building tiny %s in %s", name, folder)
                build(folder)
                marker.write_text(RECIPE_VERSION)
            records[name] = _record(name, kind, folder)
    return records
