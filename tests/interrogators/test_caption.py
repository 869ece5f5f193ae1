"""The caption form on a tiny random-weight BLIP loaded from disk through the real transformers classes."""

from __future__ import annotations

from interrogators import Captioner, CaptionOptions, InterrogatorSet
from models.cache import ModelCache
from tests.interrogators.helpers import picture


def test_caption_is_text_and_deterministic(interrogators: InterrogatorSet) -> None:
    captioner = interrogators.caption
    first = captioner.caption(picture(1), None)
    assert set(first) == {"caption"}
    assert isinstance(first["caption"], str) and first["caption"].strip()
    # Beam search without sampling: the same image gives the same caption.
    assert captioner.caption(picture(1), {}) == first


def test_length_options_bound_the_caption(interrogators: InterrogatorSet) -> None:
    captioner = interrogators.caption
    short = captioner.caption(picture(2), {"max_length": 2, "min_length": 0, "num_beams": 1})["caption"]
    long = captioner.caption(picture(2), {"max_length": 40, "min_length": 35, "num_beams": 1})["caption"]
    # Lengths count caption word pieces (not the prompt): 2 pieces make at most two words.
    assert 1 <= len(short.split()) <= 2
    assert len(long) > len(short)
    assert len(long.split()) >= 5


def test_the_prompt_conditions_the_caption_and_is_stripped(
    interrogators: InterrogatorSet, cache: ModelCache
) -> None:
    prompted = interrogators.caption
    assert prompted.prompt == "a picture of"
    unprompted = Captioner(prompted.folder, cache=cache, prompt=None)
    options = {"max_length": 12, "min_length": 12, "num_beams": 1}
    with_prompt = prompted.caption(picture(6), options)["caption"]
    without = unprompted.caption(picture(6), options)["caption"]
    assert with_prompt != without
    assert not with_prompt.startswith("a picture of")
    assert len(without.split()) >= 3


def test_beams_and_repetition_penalty_change_the_search(interrogators: InterrogatorSet) -> None:
    captioner = interrogators.caption
    base = {"max_length": 20, "min_length": 15}
    greedy = captioner.caption(picture(3), {**base, "num_beams": 1})["caption"]
    beams = captioner.caption(picture(3), {**base, "num_beams": 4})["caption"]
    penalised = captioner.caption(picture(3), {**base, "num_beams": 1, "repetition_penalty": 3.0})["caption"]
    assert beams != greedy
    assert penalised != greedy


def test_top_p_switches_to_sampling(interrogators: InterrogatorSet) -> None:
    captioner = interrogators.caption
    options = {"top_p": 0.95, "max_length": 20, "min_length": 10}
    sampled = {captioner.caption(picture(4), options)["caption"] for _ in range(4)}
    # Nucleus sampling over a random model's flat distribution: repeated calls disagree.
    assert len(sampled) > 1
    beam = {captioner.caption(picture(4), {"max_length": 20, "min_length": 10})["caption"] for _ in range(2)}
    assert len(beam) == 1


def test_options_are_clamped_and_junk_ignored() -> None:
    wild = CaptionOptions.from_payload(
        {"num_beams": 500, "max_length": 10_000, "min_length": 9_999, "top_p": 7, "repetition_penalty": -2}
    )
    assert (wild.num_beams, wild.max_length, wild.min_length) == (8, 100, 100)
    assert CaptionOptions.from_payload({"max_length": 0}).max_length == 1
    assert wild.top_p == 1.0 and wild.repetition_penalty == 1.0
    junk = CaptionOptions.from_payload(
        {"num_beams": "many", "max_length": None, "top_p": True, "min_length": []}
    )
    assert junk == CaptionOptions()
    assert CaptionOptions.from_payload({"max_length": 5}).min_length == 5  # never above max_length
    assert CaptionOptions().generate_kwargs()["do_sample"] is False
    assert CaptionOptions.from_payload({"top_p": 0.5}).generate_kwargs()["do_sample"] is True


def test_odd_image_modes_are_captioned(interrogators: InterrogatorSet) -> None:
    for mode in ("RGBA", "L", "P", "CMYK"):
        assert interrogators.caption.caption(picture(5, mode=mode), None)["caption"]
