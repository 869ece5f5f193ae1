"""Which files of a diffusers repository to download for a diffusers-shape reference record (`hf_path`).

The seed-era diffusers reference (`diffusers-2023.json`: "Stable Diffusion 2 Depth", the diffusers
inpainting model) names a Hugging Face repository instead of files. At download time (never at run time)
the hub's model API lists the repository's files with their LFS sha256; we keep what a diffusers pipeline
loads — `model_index.json` and each component folder's configs, tokenizer files and one weight format —
pinned to the listed commit, and hand them to the normal resumable, verified download path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

DEFAULT_ENDPOINT = "https://huggingface.co"
_CONFIG_SUFFIXES = (".json", ".txt", ".model")  # configs, vocab/merges, sentencepiece
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class HubFile:
    path: str  # relative to the repository root
    url: str
    sha256: str | None


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def listing_url(repo: str, endpoint: str | None = None) -> str:
    return f"{endpoint or hub_endpoint()}/api/models/{repo}?blobs=true"


def _is_variant(name: str) -> bool:
    """`diffusion_pytorch_model.fp16.safetensors`, `model.non_ema.bin`: variants have two dots."""
    return name.count(".") > 1


def select_files(repo: str, listing: dict[str, Any], endpoint: str | None = None) -> list[HubFile]:
    """The files a diffusers pipeline needs, from the hub's `api/models/<repo>?blobs=true` reply."""
    siblings = listing.get("siblings") or []
    revision = listing.get("sha") or "main"
    names = {str(s.get("rfilename", "")): s for s in siblings if isinstance(s, dict)}
    if "model_index.json" not in names:
        raise ValueError(f"{repo} has no model_index.json: not a diffusers pipeline repository")
    safetensors_dirs = {str(PurePosixPath(n).parent) for n in names
                        if n.endswith(".safetensors") and not _is_variant(PurePosixPath(n).name)}
    chosen = []
    for name, sibling in sorted(names.items()):
        path = PurePosixPath(name)
        if len(path.parts) == 1 and name != "model_index.json":
            continue  # root files besides the index: READMEs, images, the original single-file checkpoint
        if len(path.parts) > 2:
            continue  # nested folders (onnx exports, flax) are not part of a torch pipeline
        keep = path.suffix in _CONFIG_SUFFIXES or (
            path.suffix in _WEIGHT_SUFFIXES and not _is_variant(path.name)
            and (path.suffix == ".safetensors" or str(path.parent) not in safetensors_dirs))
        if keep or name == "model_index.json":
            lfs = sibling.get("lfs") if isinstance(sibling.get("lfs"), dict) else {}
            url = f"{endpoint or hub_endpoint()}/{repo}/resolve/{revision}/{name}"
            chosen.append(HubFile(name, url, (lfs.get("sha256") or None)))
    # model_index.json last: a snapshot counts as complete once it is there (models.downloads.is_ready), so
    # it must not arrive before the files it describes.
    return sorted(chosen, key=lambda f: f.path == "model_index.json")
