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
    """Build (once) tiny BLIP, CLIP and two safety checkers (one never flags, one always flags) under
    `dest` in the layout `build_interrogators` reads, and return their reference records by name."""
    builders: list[tuple[str, str, Callable[[Path], None]]] = [
        (TINY_CAPTION, "blip", _build_blip),
        (TINY_CLIP, "clip", _build_clip),
        (TINY_SAFETY, "safety_checker", lambda f: _build_safety(f, flags=False)),
        (TINY_SAFETY_FLAGS, "safety_checker", lambda f: _build_safety(f, flags=True)),
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
