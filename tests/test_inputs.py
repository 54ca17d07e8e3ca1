import numpy as np
import pytest

from nirvana import inputs as rq


def text(*values):
    return np.array([[v] for v in values], dtype=object)


def test_decodes_utf8_rows():
    assert rq.decode_texts(text("a cat".encode(), "café".encode()), "PROMPT", 2, required=True,
                           max_bytes=100) == ["a cat", "café"]


@pytest.mark.parametrize("value, message", [
    (b"", "empty"), (b"   \n", "empty"), (b"\xff\xfe", "not valid UTF-8"), (b"x" * 101, "limit is 100"),
    (b"a\x00b", "NUL")])
def test_bad_prompts_name_the_field(value, message):
    with pytest.raises(rq.InvalidInput, match=message) as info:
        rq.decode_texts(text(value), "PROMPT", 1, required=True, max_bytes=100)
    assert info.value.field == "PROMPT"
    assert str(info.value).startswith("PROMPT: ")


def test_absent_optional_text_is_empty():
    assert rq.decode_texts(None, "NEGATIVE_PROMPT", 2, required=False, max_bytes=10) == ["", ""]


def test_absent_required_input():
    with pytest.raises(rq.InvalidInput, match="PROMPT: is required"):
        rq.batch_rows(None, "PROMPT")


def test_defaults_and_ranges():
    assert rq.resolve_steps(None, 1, 50, 200).tolist() == [50]
    assert rq.resolve_guidance(None, 1, 7.5, 50).tolist() == [7.5]
    assert 0 <= int(rq.resolve_seeds(None, 1)[0]) < 2**31
    with pytest.raises(rq.InvalidInput, match="STEPS: 0 is out of range"):
        rq.resolve_steps(np.array([[0]], np.int32), 1, 50, 200)
    with pytest.raises(rq.InvalidInput, match="STEPS: 201"):
        rq.resolve_steps(np.array([[201]], np.int32), 1, 50, 200)
    with pytest.raises(rq.InvalidInput, match="GUIDANCE_SCALE"):
        rq.resolve_guidance(np.array([[np.nan]], np.float32), 1, 7.5, 50)
    with pytest.raises(rq.InvalidInput, match="GUIDANCE_SCALE"):
        rq.resolve_guidance(np.array([[-1.0]], np.float32), 1, 7.5, 50)
    with pytest.raises(rq.InvalidInput, match="SEED"):
        rq.resolve_seeds(np.array([[-5]], np.int64), 1)
    with pytest.raises(rq.InvalidInput, match="SEED: has dtype float32"):
        rq.resolve_seeds(np.array([[1.5]], np.float32), 1)


def test_timeouts_become_absolute_deadlines():
    now = 1_000_000_000_000
    assert rq.resolve_deadlines(None, 2, 3_600_000, now).tolist() == [0, 0]  # absent: no deadline
    assert rq.resolve_deadlines(np.array([[250], [1]], np.int32), 2, 3_600_000, now).tolist() == \
        [now + 250_000_000, now + 1_000_000]
    for bad in (0, -3, 3_600_001):
        with pytest.raises(rq.InvalidInput, match=f"TIMEOUT_MS: {bad} is out of range 1..3600000"):
            rq.resolve_deadlines(np.array([[bad]], np.int32), 1, 3_600_000, now)
    with pytest.raises(rq.InvalidInput, match="TIMEOUT_MS: expected shape"):
        rq.resolve_deadlines(np.array([[1, 2]], np.int32), 1, 3_600_000, now)
