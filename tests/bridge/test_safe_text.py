"""Server text made safe to show: one line, no control characters or escape sequences, secrets masked."""

from __future__ import annotations

from bridge.safe_text import mask, one_line, server_text, url_secrets

KEY = "LocalHordeTestKey01_ab"


def test_one_line_drops_escapes_and_controls_and_joins_lines() -> None:
    forged = "ok\n2026-01-01 00:00:00 ERROR forged\r\n\x1b[31mred\x1b[0m \x1b]0;title\x07bell"
    assert one_line(forged + "\x00nul\u2028sep\u202eRTL", None) == (
        "ok 2026-01-01 00:00:00 ERROR forged red bellnul sepRTL")
    assert one_line("x" * 400) == "x" * 299 + "…"


def test_masking_the_key_and_presigned_credentials() -> None:
    url = "https://r2.example/bucket/k.webp?X-Amz-Credential=AKIA123456%2F2026&X-Amz-Signature=abcdef0123456789"
    assert "abcdef0123456789" in url_secrets(url) and url_secrets("https://x/y") == []
    echoed = f"key {KEY} for {url} <SignatureProvided>zzzzzzzzzz</SignatureProvided> signature=qqqqqqqq"
    shown = mask(echoed, [KEY, *url_secrets(url)])
    for secret in (KEY, "abcdef0123456789", "AKIA123456", "zzzzzzzzzz", "qqqqqqqq"):
        assert secret not in shown
    assert mask("a short word: ab", ["ab"]) == "a short word: ab"  # too short to be a secret


def test_a_key_split_by_a_control_character_is_still_masked_and_the_cut_comes_last() -> None:
    split = KEY[:5] + "\x00" + KEY[5:]
    assert KEY[:5] + KEY[5:] not in server_text(f"bad {split}", [KEY])
    long = "y" * 290 + KEY
    assert KEY[:8] not in server_text(long, [KEY], limit=300)  # never half a key at the cut
