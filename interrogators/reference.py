"""Where the interrogation models come from and where their folders live.

The horde's own `blip.json` and `clip.json` name Salesforce's and OpenAI's original `.pth`/`.pt` files, which
need the BLIP and OpenAI-CLIP code bases to load. This bridge loads transformers-format folders instead, so it
ships its own small reference, `interrogators/reference.json`, in the horde's sibling-file shape (readable by
`models.reference.parse_reference`): one record per Hugging Face repo with the files transformers needs,
pinned to one commit (`hf_revision`; the download URLs are `resolve/<commit>/...`). `horde_name` says which
horde entry each replaces. Each file's path is
`<name>/<file>` (download `file_path` = the name): the downloader puts a category's files in
`<cache_home>/<category>/`, so the models land in `<cache_home>/<category>/<name>/`, the folder
`model_dir` names and `build_interrogators(models_dir=cache_home)` reads. Weight files carry the sha256 that
public records establish (the safety checker's `pytorch_model.bin`, as the horde's own reference lists it;
CLIP's `model.safetensors`, its LFS object id); the downloader verifies those and fetches a mismatching file
again, and reuses a Hugging Face hub cache holding the pinned revision (models.downloads.hf_cached_file).
BLIP's weights carry none: the downloader checks them against the sha256 the hub publishes for the pinned
revision (X-Linked-Etag); the small JSON/text files are pinned by the revision only. The safety pass's own
two single-file models (DeepDanbooru, the aesthetic predictor) carry their published sha256, checked again
before each load.

Nothing here touches the network: files are fetched by the model manager's downloader, never at run time.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

REFERENCE_PATH = Path(__file__).with_name("reference.json")

CAPTION_LARGE = "blip-image-captioning-large"
CAPTION_BASE = "blip-image-captioning-base"
CLIP_L14 = "clip-vit-large-patch14"
SAFETY_CHECKER = "stable-diffusion-safety-checker"
DEEPDANBOORU = "deepdanbooru-resnet-custom-v3"
AESTHETIC = "laion-aesthetic-predictor-l14"

# The reference category (and cache_home sub-folder) of each kind of interrogation model.
CAPTION_KIND = "blip"
CLIP_KIND = "clip"
SAFETY_KIND = "safety_checker"
DEEPDANBOORU_KIND = "deepdanbooru"
AESTHETIC_KIND = "aesthetic"


@cache
def reference_records() -> dict[str, dict[str, Any]]:
    """The shipped reference: name -> raw record (the horde sibling-file shape plus `category`, `hf_path`)."""
    return json.loads(REFERENCE_PATH.read_text(encoding="utf-8"))


def model_dir(models_dir: Path, kind: str, name: str) -> Path:
    """The folder of one model: `<models_dir>/<kind>/<name>` (`/` in a name becomes `-`)."""
    return Path(models_dir) / kind / name.replace("/", "-")


def reference_sha256(name: str) -> str | None:
    """The sha256 the shipped reference gives for the (single) weights file of `name`, if any."""
    record = reference_records().get(name) or {}
    hashes = [f.get("sha256sum") for f in record.get("config", {}).get("files", []) if f.get("sha256sum")]
    return str(hashes[0]).lower() if len(hashes) == 1 else None


def is_complete(folder: Path) -> bool:
    """True when a folder has a config and weights: enough to try loading, without touching the weights."""
    if not (folder / "config.json").is_file():
        return False
    return any((folder / n).is_file() for n in ("model.safetensors", "pytorch_model.bin"))
