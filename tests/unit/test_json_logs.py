"""``--log-format json``: the formatter's fields, the context fields, and secret scrubbing in
every place a secret could ride along (message, arguments, extra fields, nested values,
tracebacks, context) and in every spelling JSON could give it."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import re
import threading
from datetime import datetime

import pytest

from syncer.run.logsetup import (
    CONTEXT_FIELDS,
    ContextFilter,
    SecretScrubber,
    configure_logging,
    current_log_context,
    failure_fields,
    log_context,
    make_formatter,
    pop_log_context,
    push_log_context,
)

SECRET = 'p@ss"wörd\\x'  # a quote, a backslash and a non-ASCII letter: JSON escapes them all
TOKEN = "tok-1234567890"


def capture(log_format: str = "json", secrets=(SECRET, TOKEN)):
    """A logger writing through the syncer's handler set-up into a buffer."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    scrubber = SecretScrubber(secrets)
    handler.setFormatter(make_formatter(log_format, scrubber))
    handler.addFilter(ContextFilter())
    handler.addFilter(scrubber)
    logger = logging.getLogger(f"syncer.test.{log_format}.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger, stream


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def assert_no_secret(text: str) -> None:
    for secret in (SECRET, TOKEN):
        escaped = json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]
        for form in (secret, *escaped):
            assert form not in text, f"{form!r} in {text!r}"


def test_a_line_has_time_level_logger_message():
    logger, stream = capture()
    logger.warning("copied %d blobs", 3)
    (line,) = lines(stream)
    assert line["level"] == "WARNING"
    assert line["logger"] == logger.name
    assert line["message"] == "copied 3 blobs"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    assert datetime.fromisoformat(line["time"].replace("Z", "+00:00")).tzinfo is not None
    # Fields that are not known are left out, not written as null.
    assert not set(CONTEXT_FIELDS) & set(line)
    assert "args" not in line and "msg" not in line and "levelno" not in line


def test_context_fields_follow_the_block_and_extra_wins():
    logger, stream = capture()
    with log_context(run_id="run-1", image="a/b:1 -> c/d:1"):
        with log_context(attempt=2):
            logger.info("inner", extra={"registry": "reg:5000", "error": "HTTP 503"})
        logger.info("outer", extra={"image": "explicit"})
    logger.info("after")
    inner, outer, after = lines(stream)
    assert inner["run_id"] == "run-1" and inner["image"] == "a/b:1 -> c/d:1"
    assert inner["attempt"] == 2 and inner["registry"] == "reg:5000"
    assert inner["error"] == "HTTP 503"
    assert outer["image"] == "explicit" and "attempt" not in outer
    assert not set(CONTEXT_FIELDS) & set(after)


def test_context_is_per_thread_and_follows_a_copied_context():
    """Threads do not see each other's fields; a pool running tasks in a copied context (as
    the copier's blob pool does) carries them."""
    logger, stream = capture()
    seen: dict[str, object] = {}
    token = push_log_context(run_id="mine")
    try:
        other = threading.Thread(target=lambda: seen.update(current_log_context()))
        other.start()
        other.join()
        assert seen == {}
        copied = contextvars.copy_context()
        carried = threading.Thread(target=copied.run, args=(logger.info, "from a blob thread"))
        carried.start()
        carried.join()
    finally:
        pop_log_context(token)
    assert current_log_context() == {}
    assert lines(stream)[0]["run_id"] == "mine"


def test_none_values_are_not_bound():
    with log_context(run_id="r", image=None):
        assert dict(current_log_context()) == {"run_id": "r"}


def test_secrets_scrubbed_everywhere_in_json():
    logger, stream = capture()
    with log_context(image=f"reg/app:{TOKEN} -> x"):
        logger.info("auth with %s failed", SECRET,
                    extra={"error": f"DENIED: {SECRET}", "registry": "r",
                           "details": {"header": f"Bearer {TOKEN}", "list": [SECRET, 1]}})
    try:
        raise RuntimeError(f"boom {SECRET}")
    except RuntimeError:
        logger.exception("failed with %r", TOKEN)
    text = stream.getvalue()
    assert_no_secret(text)
    first, second = lines(stream)
    assert first["message"] == "auth with *** failed"
    assert first["error"] == "DENIED: ***"
    assert first["image"] == "reg/app:*** -> x"
    assert first["details"] == {"header": "Bearer ***", "list": ["***", 1]}
    assert "RuntimeError: boom ***" in second["exc_info"]


def test_an_object_whose_text_holds_a_secret_is_scrubbed():
    """An exception passed as an extra field would be turned into text by the encoder."""
    logger, stream = capture()
    logger.error("oops", extra={"cause": ValueError(f"bad {SECRET}")})
    assert_no_secret(stream.getvalue())
    assert lines(stream)[0]["cause"] == "bad ***"


def test_the_finished_line_is_scrubbed_in_its_escaped_forms():
    """Belt and braces: the JSON formatter scrubs its serialized line itself, so a secret that
    reached it unfiltered (a handler without the record filter) is gone however JSON spelt
    it: raw, with escaped quote and backslash, or as \\uXXXX."""
    scrubber = SecretScrubber([SECRET])
    formatter = make_formatter("json", scrubber)
    record = logging.makeLogRecord({"msg": "login %s", "args": (SECRET,), "name": "syncer.x",
                                    "levelname": "INFO", "levelno": logging.INFO,
                                    "nested": {"password": SECRET}})
    line = formatter.format(record)
    assert_no_secret(line)
    assert json.loads(line)["message"] == "login ***"
    for serialized in (json.dumps({"k": SECRET}), json.dumps({"k": SECRET}, ensure_ascii=False)):
        assert_no_secret(scrubber.scrub_serialized(serialized))


def test_text_format_is_unchanged_and_scrubbed():
    logger, stream = capture("text")
    with log_context(run_id="r-1"):
        logger.info("using %s", SECRET, extra={"error": "x"})
    text = stream.getvalue()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO    using \*\*\*\n", text)


def test_no_secrets_means_nothing_rewritten():
    logger, stream = capture(secrets=())
    logger.info("value %s", 42, extra={"error": "e"})
    assert lines(stream)[0]["message"] == "value 42"


def test_failure_fields():
    from syncer.registry.errors import AuthenticationError

    error = AuthenticationError("push: HTTP 403", registry="reg:5000", status=403)
    assert failure_fields(error, "push: HTTP 403", 2) == {
        "error": "push: HTTP 403", "attempt": 2, "registry": "reg:5000"}
    assert failure_fields(ValueError("x"), "internal error") == {"error": "internal error"}


def test_configure_logging_json_to_a_file(tmp_path):
    path = tmp_path / "syncer.log"
    configure_logging(log_file=str(path), secrets=[SECRET], log_format="json")
    try:
        with log_context(run_id="file-run"):
            logging.getLogger("syncer.run.embedded").info("synced with %s", SECRET)
        logging.getLogger("syncer.registry.transport").debug("not at INFO")
    finally:
        for handler in logging.getLogger("syncer").handlers:
            handler.close()
        configure_logging(log_file=None, secrets=())
    (line,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert line["message"] == "synced with ***" and line["run_id"] == "file-run"
    assert line["logger"] == "syncer.run.embedded" and line["level"] == "INFO"


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="log format"):
        make_formatter("xml")


def test_scrubber_learns_secrets_that_appear_after_set_up():
    """Credential helpers answer when a registry is first used, after logging was set up:
    a scrubber given a callable asks again and masks what it learnt."""
    from syncer.run.logsetup import SecretScrubber

    known: list[str] = []
    scrubber = SecretScrubber(lambda: tuple(known))
    assert scrubber.scrub("token s3cr3t-from-helper") == "token s3cr3t-from-helper"
    known.append("s3cr3t-from-helper")
    assert scrubber.scrub("token s3cr3t-from-helper") == "token ***"
    record = logging.LogRecord(
        "syncer", logging.INFO, __file__, 1, "pw=%s", ("s3cr3t-from-helper",), None
    )
    scrubber.filter(record)
    assert record.getMessage() == "pw=***"
