"""One masking rule for secrets in free text, presigned URL queries kept out of error texts,
and one rule for "this answer pauses the host"."""

from __future__ import annotations

import json

import requests

from syncer.registry.credentials import AuthEntry, Credentials, CredentialStore, mask_secrets
from syncer.registry.hostgate import DEFAULT_RATE_LIMIT_PAUSE, pause_after
from syncer.registry.transport import _brief, _spec_errors
from syncer.run.logsetup import SecretScrubber


def test_mask_secrets_longest_first_and_ignores_short_ones():
    text = "pw hunter2-secret, then hunter2, then ab"
    assert mask_secrets(text, ["hunter2", "hunter2-secret", "ab", ""]) == (
        "pw ***, then ***, then ab"
    )
    assert SecretScrubber(["hunter2", "hunter2-secret", "ab"]).scrub(text) == mask_secrets(
        text, ["hunter2", "hunter2-secret"]
    )


def test_a_spec_message_is_masked_before_it_is_cut():
    """A secret that crosses the 200-character cut leaves no prefix behind."""
    secret = "hunter2-secret"
    response = requests.Response()
    response.status_code = 400
    message = "x" * 195 + secret
    response._content = json.dumps({"errors": [{"code": "DENIED", "message": message}]}).encode()
    (error,) = _spec_errors(response, [secret])
    assert "hunter" not in error.message and error.message.endswith("***")


def test_url_queries_never_reach_an_error_text():
    exc = Exception(
        "HTTPSConnectionPool(host='s3.example', port=443): Max retries exceeded with url: "
        "/bucket/blob?X-Amz-Signature=abcdef&X-Amz-Credential=AKIA "
        "(Caused by NewConnectionError('refused'))"
    )
    text = _brief(exc)
    assert "X-Amz" not in text and "abcdef" not in text
    assert "/bucket/blob?… (Caused by NewConnectionError('refused'))" in text
    assert _brief(Exception("a" * 400), 200) == "a" * 200 + "…"


def test_store_secrets_is_rebuilt_only_when_a_helper_answer_changes():
    store = CredentialStore(
        [AuthEntry("r.io", Credentials("u", "pw-secret"))], docker_config=False
    )
    first = store.secrets
    assert first == ("pw-secret",) and store.secrets is first
    store._helpers.version += 1  # what a new helper answer does
    assert store.secrets == first and store.secrets is not first


class _Gate:
    def __init__(self):
        self.paused: list[tuple[str, float]] = []

    def pause(self, host: str, seconds: float) -> None:
        self.paused.append((host, seconds))

    def wait(self, host: str) -> None:  # pragma: no cover - not used here
        pass


def test_pause_after_is_the_one_rule():
    gate = _Gate()
    assert pause_after(gate, "h", 429, None) == DEFAULT_RATE_LIMIT_PAUSE
    assert pause_after(gate, "h", 429, 7.0) == 7.0
    assert pause_after(gate, "h", 503, 2.0) == 2.0
    assert pause_after(gate, "h", 503, None) is None
    assert pause_after(gate, "h", 500, 2.0) is None
    assert pause_after(gate, "h", 200, 2.0) is None
    assert gate.paused == [("h", DEFAULT_RATE_LIMIT_PAUSE), ("h", 7.0), ("h", 2.0)]
