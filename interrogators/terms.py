"""The term lists of the interrogation form and their on-disk embedding cache.

Embedding ~7000 terms with ViT-L/14 costs about a minute of CPU, while ranking them against one image costs
milliseconds, so text embeddings are computed once per (model, list) and kept on disk. A cache file is named
by a fingerprint of the model's files and a hash of the category's template and terms: editing a list or
swapping the weights simply misses the cache, and the stale file of that category is removed when the new
one is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

DEFAULT_TERMS_PATH = Path(__file__).parent / "data" / "terms.json"
# The result categories of the horde's interrogation form, in the order horde-sdk's status model lists them.
CATEGORIES = ("tags", "sites", "artists", "flavors", "mediums", "movements", "techniques")
_FINGERPRINT_SPAN = 1 << 20


@dataclass(frozen=True)
class TermList:
    category: str
    template: str
    terms: tuple[str, ...]

    @property
    def prompts(self) -> list[str]:
        """The texts CLIP embeds (the template applied); results report the bare terms."""
        return [self.template.format(term) for term in self.terms]

    @property
    def digest(self) -> str:
        blob = json.dumps({"template": self.template, "terms": list(self.terms)}, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def load_terms(path: Path = DEFAULT_TERMS_PATH) -> dict[str, TermList]:
    """Read a terms file (see interrogators/data/README.md); categories keep the file's order."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    lists: dict[str, TermList] = {}
    for category, entry in data["categories"].items():
        terms = tuple(dict.fromkeys(str(t).strip() for t in entry["terms"] if str(t).strip()))
        if not terms:
            raise ValueError(f"terms file {path}: category {category!r} is empty")
        template = str(entry.get("template") or "{}")
        if "{}" not in template:
            raise ValueError(f"terms file {path}: template of {category!r} has no '{{}}'")
        lists[category] = TermList(category, template, terms)
    return lists


def model_fingerprint(folder: Path) -> str:
    """A cheap identity of a model folder: its config plus the size, head and tail of each weight file.
    Random-weight rebuilds and real downloads differ in all of these; hashing gigabytes would not pay."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.name == "config.json":
            digest.update(path.read_bytes())
        elif path.suffix in (".safetensors", ".bin"):
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with path.open("rb") as handle:
                digest.update(handle.read(_FINGERPRINT_SPAN))
                handle.seek(max(0, size - _FINGERPRINT_SPAN))
                digest.update(handle.read(_FINGERPRINT_SPAN))
    return digest.hexdigest()


class EmbeddingStore:
    """Text embeddings on disk (float32, L2-normalised): `<root>/<model id>/<category>-<hash>.safetensors`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, model_id: str, terms: TermList) -> Path:
        return self.root / model_id[:16] / f"{terms.category}-{terms.digest[:16]}.safetensors"

    def load(self, model_id: str, terms: TermList) -> torch.Tensor | None:
        path = self.path(model_id, terms)
        if not path.is_file():
            return None
        try:
            tensor = load_file(str(path))["embeddings"]
        except Exception as exc:  # a torn or foreign file is just a miss
            logger.warning("embedding cache %s unreadable (%s); recomputing", path, exc)
            return None
        if tensor.shape[0] != len(terms.terms):
            logger.warning(
                "embedding cache %s has %d rows for %d terms; recomputing",
                path,
                tensor.shape[0],
                len(terms.terms),
            )
            return None
        return tensor

    def save(self, model_id: str, terms: TermList, embeddings: torch.Tensor) -> Path:
        path = self.path(model_id, terms)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f"{terms.category}-*.safetensors"):
            if stale != path:
                stale.unlink(missing_ok=True)
        # Write then rename, so that a crash or a concurrent reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            meta = {"category": terms.category, "terms_sha256": terms.digest, "model": model_id}
            save_file(
                {"embeddings": embeddings.detach().to("cpu", torch.float32).contiguous()}, tmp, metadata=meta
            )
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path
