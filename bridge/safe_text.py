"""Text from the other side (the horde, R2, a source host, a requester) made safe to show.

Two things go wrong with such text: it can carry our own secrets back (an error message quoting the api key,
an object store echoing the presigned signature it refused), and it can carry control characters (a moderator
message with a newline forges a second log line; ANSI escapes repaint the operator's terminal). Every server
text that reaches a log line, a submit's `gen_metadata` or the status panel goes through `server_text`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlsplit

MASK = "***"
# ANSI/VT escape sequences (CSI, OSC and two-character escapes): removed whole, not just their ESC byte.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
# C0 and C1 control characters, DEL, and the Unicode line/paragraph separators and bidi overrides.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# Credential-bearing query parameters and headers, whoever echoes them (S3/R2 errors quote the signature).
_CREDENTIAL = re.compile(
    r"(?i)\b(x-amz-signature|x-amz-credential|x-amz-security-token|signature|apikey|api_key|awsaccesskeyid)"
    r"(\s*[=:]\s*|</?\w*>)([^\s&\"'<>,;]+)"
)
_S3_XML = re.compile(r"(?i)<(SignatureProvided|StringToSign|CanonicalRequest|AWSAccessKeyId)>[^<]*<")
MIN_SECRET_CHARS = 6  # shorter "secrets" (an empty query value, "1") would mask ordinary words


def mask(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every secret, and anything shaped like a presigned credential, replaced by ***."""
    for secret in sorted({s for s in secrets if s and len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _S3_XML.sub(lambda m: f"<{m.group(1)}>{MASK}<", text)
    return _CREDENTIAL.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)


def url_secrets(url: str | None) -> list[str]:
    """The query of a presigned URL, whole and value by value: each is a credential."""
    if not url:
        return []
    query = urlsplit(url).query
    if not query:
        return []
    return [query, *(value for _, value in parse_qsl(query, keep_blank_values=True))]


def one_line(text: str, limit: int | None = 300) -> str:
    """No escape sequences, no control characters: newlines and tabs become spaces, the rest is dropped."""
    text = _ANSI.sub("", text)
    text = re.sub(r"[\r\n\t\v\f\u2028\u2029]+", " ", text)
    text = _CONTROL.sub("", text).strip()
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def server_text(text: object, secrets: Iterable[str] = (), *, limit: int | None = 300) -> str:
    """What may be shown of a server's text: secrets masked, one line, control characters gone, bounded.

    Control characters go first (a key split by a NUL byte would slip past the mask), the cut comes last (half
    a key is still half a key)."""
    return one_line(mask(one_line(str(text), None), secrets), limit)
