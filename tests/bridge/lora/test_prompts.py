"""TI vectors in prompt embeddings: they reach the text encoder at their positions, strengths weigh them, and
a prompt without TIs encodes exactly as the pipeline itself encodes it (the hook is inert for others)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from bridge.lora.prompts import encode_prompts, install_hooks, names_in, strip_markers, tokenize
from bridge.lora.weights import TiEmbedding
from models.tiny import tiny_pipeline


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def pipe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    pipe = tiny_pipeline(request.param, seed=0, work=tmp_path_factory.mktemp(f"prompts-{request.param}"))
    install_hooks(pipe)
    return pipe


def word_as_ti(pipe: Any, word: str) -> TiEmbedding:
    """A TI whose vectors are exactly the token embeddings of `word` in each text encoder."""
    by_width = {}
    for tokenizer, encoder in (
        (pipe.tokenizer, pipe.text_encoder),
        (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None)),
    ):
        if encoder is None:
            continue
        ids = tokenizer(word, add_special_tokens=False).input_ids
        by_width[int(encoder.config.hidden_size)] = (
            encoder.get_input_embeddings().weight[ids].detach().clone()
        )
    return TiEmbedding(by_width)


def reference(pipe: Any, prompt: str, negative: str) -> dict[str, torch.Tensor]:
    if getattr(pipe, "text_encoder_2", None) is None:
        positive, negative_embeds = pipe.encode_prompt(prompt, "cpu", 1, True, negative)
        return {"prompt_embeds": positive, "negative_prompt_embeds": negative_embeds}
    out = pipe.encode_prompt(prompt, device="cpu", negative_prompt=negative)
    names = (
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    )
    return dict(zip(names, out, strict=True))


def test_markers_are_found_and_stripped() -> None:
    text = "(embedding:BadHand:0.8), a cat, embedding:1234 in a hat"
    assert names_in(text) == ["badhand", "1234"]
    assert strip_markers(text, {"badhand"}) == "a cat, embedding:1234 in a hat"
    assert strip_markers("a cat,(embedding:x:1)", {"x"}) == "a cat"


def test_without_tis_the_encoding_is_the_pipelines_own(pipe: Any) -> None:
    ours = encode_prompts(pipe, "a red fox", "blurry", {}, clip_skip=1)
    theirs = reference(pipe, "a red fox", "blurry")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_ti_vectors_reach_the_encoder_in_the_prompt_and_the_negative(pipe: Any) -> None:
    tis = {"fox": word_as_ti(pipe, "red fox")}
    ours = encode_prompts(pipe, "a embedding:fox", "(embedding:fox:1)", tis, clip_skip=1)
    theirs = reference(pipe, "a red fox", "red fox")
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)


def test_strength_weighs_the_ti_positions(pipe: Any) -> None:
    tis = {"fox": word_as_ti(pipe, "fox")}
    full = encode_prompts(pipe, "(embedding:fox:1)", "", tis, clip_skip=1)["prompt_embeds"]
    half = encode_prompts(pipe, "(embedding:fox:0.5)", "", tis, clip_skip=1)["prompt_embeds"]
    zero = encode_prompts(pipe, "(embedding:fox:0)", "", tis, clip_skip=1)["prompt_embeds"]
    empty = reference(pipe, "", "")["prompt_embeds"]
    tokens = tokenize(pipe.tokenizer, "(embedding:fox:1)", tis, int(pipe.text_encoder.config.hidden_size))
    positions = tokens.positions
    assert positions and torch.allclose(zero[:, positions], empty[:, positions], atol=1e-5)
    assert torch.allclose(half[:, positions], (full[:, positions] + empty[:, positions]) / 2, atol=1e-5)
    others = [i for i in range(full.shape[1]) if i not in positions]
    assert torch.equal(full[:, others], half[:, others])


def test_clip_skip_with_tis(pipe: Any) -> None:
    tis = {"fox": word_as_ti(pipe, "fox")}
    last = encode_prompts(pipe, "embedding:fox", "", tis, clip_skip=1)["prompt_embeds"]
    earlier = encode_prompts(pipe, "embedding:fox", "", tis, clip_skip=2)["prompt_embeds"]
    assert not torch.equal(last, earlier)


def test_a_ti_for_another_width_is_left_out(pipe: Any, tmp_path: Path) -> None:
    tis = {"odd": TiEmbedding({7: torch.ones(2, 7)})}
    tokens = tokenize(pipe.tokenizer, "a embedding:odd cat", tis, int(pipe.text_encoder.config.hidden_size))
    assert tokens.positions == []
