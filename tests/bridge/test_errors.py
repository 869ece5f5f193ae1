"""classify(): every row of the contract's error table maps to the documented policy.

The same rows are exercised over real HTTP in test_horde_api.py; here the mapping itself is pinned,
including the cases the contract leaves to us.
"""

from __future__ import annotations

import logging

import pytest

from bridge.errors import (
    HordeError,
    JobDroppedError,
    JobFaultError,
    MaintenanceError,
    Policy,
    RetryableError,
    WorkerStopError,
    already_delivered,
    classify,
    endpoint_kind,
    mask_key,
    redact,
)

VALIDATION = {
    "message": "Input payload validation failed",
    "errors": {"seed": "'123' is not of type 'integer'"},
}


def rc(code: str, message: str = "x") -> dict:
    return {"message": message, "rc": code}


@pytest.mark.parametrize(
    ("status", "body", "endpoint", "policy"),
    [
        (None, "ConnectionError: refused", "generate/pop", Policy.RETRY),
        (None, "ReadTimeout", "generate/submit", Policy.RETRY),
        (500, {"message": "Internal Server Error"}, "generate/submit", Policy.RETRY),
        (502, "<html>Bad Gateway</html>", "interrogate/pop", Policy.RETRY),
        (503, None, "upload", Policy.RETRY),
        (429, "429 Too Many Requests: 60 per 1 second", "generate/pop", Policy.RETRY),
        (200, "not json", "generate/pop", Policy.RETRY),
        (401, rc("InvalidAPIKey"), "generate/pop", Policy.RETRY),
        (401, rc("InvalidAPIKey"), "find_user", Policy.STOP),
        (403, rc("TooManyNewIPs"), "generate/pop", Policy.RETRY),
        (403, rc("AnonForbiddenWorker"), "generate/pop", Policy.STOP),
        (403, rc("WrongCredentials"), "generate/pop", Policy.STOP),
        (403, rc("WrongCredentials"), "interrogate/pop", Policy.STOP),
        (403, rc("WrongCredentials"), "generate/submit", Policy.DROP),
        (403, rc("WrongCredentials"), "interrogate/submit", Policy.DROP),
        (403, rc("WorkerMaintenance"), "generate/pop", Policy.MAINTENANCE),
        (403, rc("WorkerFlaggedMaintenance"), "interrogate/pop", Policy.MAINTENANCE),
        (403, {"message": "This worker is in maintenance mode"}, "generate/pop", Policy.MAINTENANCE),
        (403, rc("UnsafeIP"), "generate/pop", Policy.STOP),
        (403, rc("TimeoutIP"), "generate/pop", Policy.STOP),
        (403, rc("TooManySameIPs"), "generate/pop", Policy.STOP),
        (403, rc("TooManyWorkers"), "generate/pop", Policy.STOP),
        (403, rc("TooManyWorkersTrusted"), "generate/pop", Policy.STOP),
        (403, rc("WorkerInviteOnly"), "generate/pop", Policy.STOP),
        (403, rc("DeletedUser"), "generate/pop", Policy.STOP),
        (
            400,
            rc("BadRequest", "cannot accept workers serving unrecognised models"),
            "generate/pop",
            Policy.STOP,
        ),
        (400, rc("InvalidPriorityUsername"), "generate/pop", Policy.STOP),
        (400, rc("PolymorphicNameConflict"), "interrogate/pop", Policy.STOP),
        (400, rc("ProfaneWorkerName"), "generate/pop", Policy.STOP),
        (400, rc("ProfaneBridgeAgent"), "generate/pop", Policy.STOP),
        (400, VALIDATION, "generate/pop", Policy.STOP),
        (400, VALIDATION, "generate/submit", Policy.FAULT),
        (400, VALIDATION, "interrogate/submit", Policy.FAULT),
        (400, rc("DuplicateGen"), "generate/submit", Policy.DROP),
        (400, rc("DuplicateGen"), "interrogate/submit", Policy.DROP),
        (400, rc("AbortedGen"), "generate/submit", Policy.DROP),
        (400, rc("BadRequest", "too many gen_metadata"), "generate/submit", Policy.FAULT),
        (404, rc("InvalidJobID"), "generate/submit", Policy.DROP),
        (404, rc("InvalidJobID"), "interrogate/submit", Policy.DROP),
        # Not the horde's word (no rc): a CDN's page or a proxy's answer is transient, until the ttl.
        (404, "<html>not found</html>", "generate/submit", Policy.RETRY),
        (403, "<html><body>Access denied by the CDN</body></html>", "generate/pop", Policy.RETRY),
        (403, "<html>blocked</html>", "interrogate/submit", Policy.RETRY),
        (408, {"message": "Request Timeout"}, "generate/pop", Policy.RETRY),
        (408, "Request Timeout", "generate/submit", Policy.RETRY),
        (404, {"message": "The requested URL was not found on the server."}, "generate/pop", Policy.RETRY),
        (302, None, "generate/pop", Policy.RETRY),
        (307, None, "interrogate/submit", Policy.RETRY),
        (307, None, "upload", Policy.FAULT),
        (404, rc("UserNotFound"), "find_user", Policy.STOP),
        (404, rc("WorkerNotFound"), "workers", Policy.DROP),
        (403, rc("NotOwner"), "workers", Policy.DROP),
        (403, "<Error><Code>AccessDenied</Code></Error>", "upload", Policy.FAULT),
        (418, rc("SomethingNew"), "generate/pop", Policy.STOP),
        (301, None, "heartbeat", Policy.DROP),
    ],
)
def test_contract_rows_map_to_their_policy(status, body, endpoint, policy) -> None:
    error = classify(status, body, endpoint=endpoint)
    assert error.policy is policy
    assert isinstance(error, HordeError)
    assert error.status == status
    assert error.endpoint == endpoint


def test_one_class_per_policy() -> None:
    classes = {RetryableError, JobFaultError, JobDroppedError, WorkerStopError, MaintenanceError}
    assert {cls.policy for cls in classes} == set(Policy)
    assert type(classify(500, None, endpoint="generate/pop")) is RetryableError
    assert type(classify(400, rc("DuplicateGen"), endpoint="generate/submit")) is JobDroppedError


def test_stop_errors_tell_the_operator_what_to_change() -> None:
    anon = classify(403, rc("AnonForbiddenWorker", "Anonymous user is forbidden"), endpoint="generate/pop")
    assert "api_key" in anon.message and "register" in anon.message
    assert "Anonymous user is forbidden" in anon.message  # the server's own words are kept
    name = classify(403, rc("WrongCredentials"), endpoint="generate/pop")
    assert "worker_name" in name.message and "belongs to another account" in name.message
    models = classify(400, rc("BadRequest", "unrecognised models"), endpoint="generate/pop")
    assert "models_to_load" in models.message
    assert (
        "priority_usernames" in classify(400, rc("InvalidPriorityUsername"), endpoint="generate/pop").message
    )
    assert "horde_url" in classify(404, "<html/>", endpoint="generate/pop").message


def test_server_text_is_one_line_and_never_carries_secrets() -> None:
    key = "LocalHordeTestKey01_ab"
    forged = f"bad key {key}\n2026-01-01 INFO forged line \x1b[31mred\x1b[0m"
    body = {"message": forged, "rc": "InvalidAPIKey"}
    error = classify(401, body, endpoint="find_user", secrets=[key])
    assert key not in str(error) and "***" in error.message
    assert "\n" not in error.message and "\x1b" not in error.message and "forged line red" in error.message
    r2 = "<Error><Code>SignatureDoesNotMatch</Code><SignatureProvided>abc123def456</SignatureProvided>"
    assert "abc123def456" not in classify(403, r2, endpoint="upload").message


def test_validation_errors_are_kept_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bridge.errors"):
        error = classify(400, VALIDATION, endpoint="generate/submit")
    assert error.rc is None
    assert error.errors == VALIDATION["errors"]
    assert "is not of type 'integer'" in caplog.text


def test_rc_message_and_retry_after_are_carried() -> None:
    error = classify(429, "Too Many Requests", endpoint="generate/pop", retry_after=3.0)
    assert error.retry_after == 3.0
    assert error.message == "Too Many Requests"
    dup = classify(400, rc("DuplicateGen", "Job already submitted."), endpoint="generate/submit")
    assert (dup.rc, dup.message) == ("DuplicateGen", "Job already submitted.")
    assert "DuplicateGen" in str(dup) and "generate/submit" in str(dup)


def test_text_bodies_are_shortened_to_one_line() -> None:
    error = classify(502, "<html>\n" + "x" * 5000, endpoint="generate/pop")
    assert error.message == "<html>"
    assert "malformed" in classify(200, "", endpoint="generate/pop").message


def test_endpoint_kinds() -> None:
    assert endpoint_kind("generate/pop") == "pop"
    assert endpoint_kind("interrogate/submit") == "submit"
    assert endpoint_kind("upload") == "upload"
    assert endpoint_kind("workers") == "other"


def test_key_helpers_never_reveal_the_key() -> None:
    key = "abcdefghijklmnopqrstuv"
    assert key not in mask_key(key) and not any(part in mask_key(key) for part in ("ab", "uv"))
    assert redact(f"bad key {key}!", key) == "bad key ***!"
    assert redact("text", "") == "text"


def test_duplicate_after_a_lost_answer_means_delivered() -> None:
    def duplicate(*earlier: HordeError, endpoint: str = "interrogate/submit") -> HordeError:
        error = classify(400, rc("DuplicateGen"), endpoint=endpoint)
        error.earlier = earlier
        return error

    lost = classify(None, "ConnectionError: connection dropped", endpoint="interrogate/submit")
    proxy = classify(502, "<html>bad gateway</html>", endpoint="generate/submit")
    garbled = classify(200, "not json", endpoint="generate/submit")
    limited = classify(429, "Too Many Requests", endpoint="generate/submit")
    assert already_delivered(duplicate(lost))
    assert already_delivered(duplicate(limited, proxy, endpoint="generate/submit"))
    assert already_delivered(duplicate(garbled, endpoint="generate/submit"))
    # Refused before it was handled (429), or a first attempt already a duplicate: nothing says we delivered.
    assert not already_delivered(duplicate(limited))
    assert not already_delivered(duplicate())
    aborted = classify(400, rc("AbortedGen"), endpoint="generate/submit")
    aborted.earlier = (lost,)
    assert not already_delivered(aborted)
