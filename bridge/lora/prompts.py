"""Prompt embeddings with textual-inversion vectors, at their strength.

A prompt names a TI as `embedding:NAME` or `(embedding:NAME:STRENGTH)` (the peers' ComfyUI syntax, which
the horde's `inject_ti` produces). The prompt is tokenized piece by piece; each TI takes as many positions as
it has vectors, and while the text encoder runs, its token-embedding output at those positions is replaced by
the vectors (a forward hook that acts only for the thread that set it: other jobs on the same model are
untouched). A strength other than 1 scales the TI positions' encoder output away from the empty prompt's, as
ComfyUI weights tokens: `empty + strength * (out - empty)`.

SD 1/2: the last hidden state (or, with clip_skip, an earlier layer through the final layer norm), as
diffusers' own encode_prompt and the runner's clip_skip path. SDXL: both encoders' penultimate hidden states
side by side and the second encoder's pooled projection, as StableDiffusionXLPipeline.encode_prompt.
"""

from __future__ import annotations

import contextvars
import re
import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from bridge.lora.weights import TiEmbedding

MARKER = re.compile(r"\(embedding:([^:()]+)(?::\s*(-?\d+(?:\.\d+)?))?\)|embedding:([^\s,()]+)", re.IGNORECASE)
PLACEHOLDER_ID = (
    0  # any id but the end-of-text one (pooling looks for that); its embedding is replaced anyway
)
_ACTIVE: contextvars.ContextVar[dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None] = (
    contextvars.ContextVar("ti_overrides", default=None)
)
_HOOKED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
_HOOK_LOCK = threading.Lock()


def names_in(text: str) -> list[str]:
    """The TI names a prompt refers to (lower case)."""
    return [(m.group(1) or m.group(3)).strip().lower() for m in MARKER.finditer(text)]


def strip_markers(text: str, names: set[str]) -> str:
    """`text` without the markers of the given TI names (TIs that were dropped)."""

    def drop(match: re.Match[str]) -> str:
        return "" if (match.group(1) or match.group(3)).strip().lower() in names else match.group(0)

    return re.sub(r"\s*,\s*,", ",", MARKER.sub(drop, text)).strip(" ,")


def has_markers(text: str, tis: Mapping[str, TiEmbedding]) -> bool:
    return any(name in tis for name in names_in(text))


# --- the embedding hook ------------------------------------------------------------------------------------


def _ti_hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
    active = _ACTIVE.get()
    entry = active.get(id(module)) if active else None
    if entry is None:
        return None
    rows, cols, vectors = entry
    output = output.clone()
    output[rows, cols] = vectors.to(device=output.device, dtype=output.dtype)
    return output


def install_hooks(pipe: Any) -> None:
    """Give each text encoder's token embedding the TI hook, once (a no-op for threads that set nothing).
    Call only while no other job runs on the model (the LoRA gate guarantees it)."""
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is None:
            continue
        embedding = encoder.get_input_embeddings()
        with _HOOK_LOCK:
            if embedding not in _HOOKED:
                embedding.register_forward_hook(_ti_hook)
                _HOOKED.add(embedding)


@contextmanager
def _overriding(
    embedding: torch.nn.Module, rows: list[int], cols: list[int], vectors: torch.Tensor
) -> Iterator:
    current = dict(_ACTIVE.get() or {})
    current[id(embedding)] = (torch.tensor(rows), torch.tensor(cols), vectors)
    token = _ACTIVE.set(current)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


# --- tokenizing ------------------------------------------------------------------------------------------


@dataclass
class Tokens:
    ids: torch.Tensor  # [1, max_length]
    positions: list[int]  # where TI vectors go
    vectors: list[torch.Tensor]  # one [width] vector per position
    weighted: list[tuple[int, float]]  # (position, strength) for strengths other than 1


def tokenize(
    tokenizer: Any, text: str, tis: Mapping[str, TiEmbedding], width: int, default: float = 1.0
) -> Tokens:
    """bos + text pieces and TI placeholders + eos, padded as the pipelines pad (truncated to fit)."""
    limit = int(tokenizer.model_max_length)
    ids: list[int] = [tokenizer.bos_token_id]
    positions: list[int] = []
    vectors: list[torch.Tensor] = []
    weighted: list[tuple[int, float]] = []
    cursor = 0
    pieces: list[tuple[str, TiEmbedding | None, float]] = []
    for match in MARKER.finditer(text):
        name = (match.group(1) or match.group(3)).strip().lower()
        if name not in tis:
            continue
        pieces.append((text[cursor : match.start()], None, 1.0))
        strength = float(match.group(2)) if match.group(2) else default
        pieces.append(("", tis[name], strength))
        cursor = match.end()
    pieces.append((text[cursor:], None, 1.0))
    for piece, embedding, strength in pieces:
        if embedding is None:
            if piece.strip():
                ids += tokenizer(piece, add_special_tokens=False).input_ids
            continue
        rows = embedding.vectors_for(width)
        if rows is None:
            continue
        for row in rows:
            positions.append(len(ids))
            vectors.append(row)
            if strength != 1.0:
                weighted.append((len(ids), strength))
            ids.append(PLACEHOLDER_ID)
    ids = ids[: limit - 1] + [tokenizer.eos_token_id]
    keep = [i for i, p in enumerate(positions) if p < limit - 1]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids += [pad] * (limit - len(ids))
    return Tokens(
        ids=torch.tensor([ids]),
        positions=[positions[i] for i in keep],
        vectors=[vectors[i] for i in keep],
        weighted=[(p, s) for p, s in weighted if p < limit - 1],
    )


# --- encoding --------------------------------------------------------------------------------------------


def _run(encoder: Any, tokens: Tokens) -> Any:
    embedding = encoder.get_input_embeddings()
    ids = tokens.ids.to(encoder.device)
    if not tokens.positions:
        return encoder(ids, output_hidden_states=True)
    vectors = torch.stack(tokens.vectors)
    with _overriding(embedding, [0] * len(tokens.positions), tokens.positions, vectors):
        return encoder(ids, output_hidden_states=True)


def _weigh(
    hidden: torch.Tensor, empty: torch.Tensor | None, weighted: list[tuple[int, float]]
) -> torch.Tensor:
    if not weighted or empty is None:
        return hidden
    hidden = hidden.clone()
    for position, strength in weighted:
        base = empty[:, position]
        hidden[:, position] = base + (hidden[:, position] - base) * strength
    return hidden


def _layer(out: Any, encoder: Any, skip: int, *, sdxl: bool) -> torch.Tensor:
    if sdxl:
        return out.hidden_states[-(skip + 2)]
    if skip == 0:
        return out.last_hidden_state
    inner = getattr(encoder, "text_model", encoder)
    return inner.final_layer_norm(out.hidden_states[-(skip + 1)])


def _encode_one(pipe: Any, text: str, tis: Mapping[str, TiEmbedding], skip: int) -> tuple[torch.Tensor, Any]:
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    if sdxl:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    hidden_states, pooled = [], None
    for tokenizer, encoder in pairs:
        if encoder is None:
            continue
        width = int(encoder.config.hidden_size)
        tokens = tokenize(tokenizer, text, tis, width)
        out = _run(encoder, tokens)
        hidden = _layer(out, encoder, skip, sdxl=sdxl)
        if tokens.weighted:
            empty_out = _run(encoder, tokenize(tokenizer, "", {}, width))
            hidden = _weigh(hidden, _layer(empty_out, encoder, skip, sdxl=sdxl), tokens.weighted)
        hidden_states.append(hidden)
        pooled = out[0] if sdxl else None
    return torch.cat(hidden_states, dim=-1), pooled


@torch.no_grad()
def encode_prompts(
    pipe: Any, prompt: str, negative: str, tis: Mapping[str, TiEmbedding], clip_skip: int
) -> dict[str, torch.Tensor]:
    """The pipeline call's prompt_embeds / negative_prompt_embeds (and SDXL's pooled ones) for prompts with TI
    markers. `clip_skip` is the horde's (1 = the last layer)."""
    skip = max(0, int(clip_skip) - 1)
    positive, pooled = _encode_one(pipe, prompt, tis, skip)
    sdxl = pooled is not None
    if sdxl and not negative and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        negative_embeds, negative_pooled = torch.zeros_like(positive), torch.zeros_like(pooled)
    else:
        negative_embeds, negative_pooled = _encode_one(pipe, negative, tis, skip)
    kwargs = {"prompt_embeds": positive, "negative_prompt_embeds": negative_embeds}
    if sdxl:
        kwargs.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled)
    return kwargs
