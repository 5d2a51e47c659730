"""The engine's rules on their own: Gemma turns, reasoning stripping, budget, guard, schemas."""

from __future__ import annotations

import json

import jsonschema
import pytest
from pydantic import BaseModel, Field

from coheara import model_facts
from coheara.backends.base import ChatRequest, Message
from coheara.engine.budget import TokenEstimator, check_fits, check_not_truncated
from coheara.engine.chat_format import (
    InputMessage,
    ReasoningFilter,
    strip_reasoning,
    to_gemma_turns,
)
from coheara.engine.guard import RepetitionGuard
from coheara.engine.schema import OutputSchema
from coheara.errors import ContextOverflowError, InvalidRequestError, SilentTruncationError

# ----- Gemma turns ------------------------------------------------------------------------


def test_system_text_is_folded_into_first_user_turn() -> None:
    turns = to_gemma_turns(
        [
            InputMessage("system", "Be brief."),
            InputMessage("user", "Question one"),
            InputMessage("assistant", "Answer one"),
            InputMessage("user", "Question two"),
        ]
    )
    assert [t.role for t in turns] == ["user", "assistant", "user"]
    assert turns[0].system == "Be brief." and turns[0].text == "Question one"
    assert turns[0].folded_text == "Be brief.\n\nQuestion one"
    assert turns[2].text == "Question two" and turns[2].system == ""


def test_consecutive_same_role_messages_are_merged() -> None:
    turns = to_gemma_turns([InputMessage("user", "a"), InputMessage("user", "b")])
    assert len(turns) == 1 and turns[0].text == "a\n\nb"


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [InputMessage("system", "only system")],
        [InputMessage("assistant", "hi"), InputMessage("user", "q")],
        [InputMessage("user", "q"), InputMessage("assistant", "a")],
        [InputMessage("user", "   ")],
    ],
)
def test_malformed_conversations_are_refused(messages: list[InputMessage]) -> None:
    with pytest.raises(InvalidRequestError):
        to_gemma_turns(messages)


# ----- hidden reasoning -------------------------------------------------------------------

THOUGHT = "<unused94>thought\nweigh <unused9 options<unused95>\n\nPneumonia is likely."


def test_strip_reasoning_removes_the_block_and_counts_it() -> None:
    answer, hidden = strip_reasoning(THOUGHT)
    assert answer == "Pneumonia is likely."
    assert hidden == len(THOUGHT) - len(answer)


def test_unterminated_reasoning_hides_everything_after_it() -> None:
    assert strip_reasoning("Visible. <unused94>thought never closed")[0] == "Visible. "


@pytest.mark.parametrize("step", [1, 2, 3, 5, 11, 1000])
def test_streaming_filter_matches_whole_text_at_any_chunking(step: int) -> None:
    stream = ReasoningFilter()
    pieces = [stream.feed(THOUGHT[i : i + step]) for i in range(0, len(THOUGHT), step)]
    out = "".join(pieces) + stream.flush()
    assert out == strip_reasoning(THOUGHT)[0]
    assert stream.hidden_chars == strip_reasoning(THOUGHT)[1]


def test_streaming_filter_releases_a_false_marker_prefix() -> None:
    stream = ReasoningFilter()
    assert stream.feed("a <unus") == "a "
    assert stream.feed("ual finding") == "<unusual finding"


# ----- context budget ---------------------------------------------------------------------


def _request(text: str, images: int = 0) -> ChatRequest:
    import numpy as np

    from coheara.imaging import load_image

    image = load_image(np.zeros((8, 8, 3), dtype=np.uint8))
    return ChatRequest((Message("user", text, (image,) * images),))


def test_estimate_is_conservative_and_counts_images() -> None:
    size = TokenEstimator().measure(_request("x" * 3000, images=2), None)
    assert size.tokens >= 3000 / 3 + 2 * model_facts.IMAGE_PROMPT_TOKENS
    assert size.lower_bound <= 3000 / 6 + 2 * model_facts.IMAGE_SOFT_TOKENS
    assert not size.exact


def test_exact_count_is_used_when_given() -> None:
    size = TokenEstimator().measure(_request("anything"), 1234)
    assert (size.tokens, size.exact, size.lower_bound) == (1234, True, 1234)


def test_estimator_learns_from_backend_counts() -> None:
    estimator = TokenEstimator()
    request = _request("word " * 800)  # 4000 chars
    before = estimator.measure(request, None).tokens
    size = estimator.measure(request, None)
    estimator.observe(size, 800 + size.overhead)  # the backend says 5 chars a token
    after = estimator.measure(request, None).tokens
    assert after < before
    assert after >= 800  # still not below what the backend reported


def test_overflow_error_states_the_numbers() -> None:
    size = TokenEstimator().measure(_request("y" * 30000, images=1), None)
    with pytest.raises(ContextOverflowError) as caught:
        check_fits(size, 1024, 8192)
    message = str(caught.value)
    assert str(size.tokens) in message and "1024" in message and "8192" in message
    assert "1 image(s) x 260" in message and "COHEARA_NUM_CTX" in message
    assert caught.value.details["window"] == 8192


def test_fitting_request_passes() -> None:
    check_fits(TokenEstimator().measure(_request("short"), None), 1024, 8192)


def test_truncation_is_detected_from_a_low_or_full_count() -> None:
    size = TokenEstimator().measure(_request("z" * 40000), None)
    with pytest.raises(SilentTruncationError):
        check_not_truncated(size, 2048, 16384)  # far below the least the prompt can be
    with pytest.raises(SilentTruncationError):
        check_not_truncated(size, 16384, 16384)  # the window exactly full
    check_not_truncated(size, 9000, 16384)  # plausible: no error


# ----- degeneration guard -----------------------------------------------------------------


def _first_trip(text: str, step: int = 4) -> int | None:
    guard = RepetitionGuard()
    for i in range(0, len(text), step):
        if guard.feed(text[i : i + step]) is not None:
            return i + step
    return None


def test_sentence_loop_is_stopped_soon_after_it_starts() -> None:
    head = "Assessment: stable. "
    loop = "Continue to monitor vitals. "
    tripped = _first_trip(head + loop * 50)
    assert tripped is not None
    assert tripped - len(head) <= max(160, 4 * len(loop)) + 32


def test_json_loop_is_stopped() -> None:
    text = '{"findings": ["effusion", ' + '"effusion", ' * 60
    assert _first_trip(text) is not None


@pytest.mark.parametrize(
    "text",
    [
        "Patient reports chest pain radiating to the left arm, onset two hours ago. " * 1
        + "ECG shows sinus rhythm. Troponin pending. Plan: serial troponins, aspirin given.",
        "| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |\n",
        "-" * 100,
    ],
)
def test_ordinary_text_does_not_trip(text: str) -> None:
    assert _first_trip(text) is None


# ----- schemas ----------------------------------------------------------------------------


def test_every_string_and_array_gets_a_bound() -> None:
    schema = OutputSchema.build(
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "tight": {"type": "string", "maxLength": 5},
                "codes": {"type": "array", "items": {"type": "string"}},
                "nested": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "kind": {"type": "string", "enum": ["a", "b"]},
            },
            "$defs": {"x": {"type": ["string", "null"]}},
        }
    ).schema
    props = schema["properties"]
    assert props["name"]["maxLength"] == 2000
    assert props["tight"]["maxLength"] == 5
    assert props["codes"]["maxItems"] == 64
    assert props["codes"]["items"]["maxLength"] == 2000
    assert props["nested"]["anyOf"][0]["maxLength"] == 2000
    assert "maxLength" not in props["kind"]
    assert schema["$defs"]["x"]["maxLength"] == 2000
    assert schema["maxProperties"] == 64  # an open object is bounded too


def test_closed_objects_get_no_property_bound_and_open_ones_keep_a_tighter_one() -> None:
    closed = OutputSchema.build(
        {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False}
    ).schema
    assert "maxProperties" not in closed
    assert OutputSchema.build({"type": "object", "maxProperties": 3}).schema["maxProperties"] == 3


class Vitals(BaseModel):
    heart_rate: int = Field(ge=20, le=250)
    rhythm: str


def test_pydantic_model_schema_is_bounded_and_validated_to_an_instance() -> None:
    schema = OutputSchema.build(Vitals)
    assert schema.schema["properties"]["rhythm"]["maxLength"] == 2000
    value, problems = schema.validate('{"heart_rate": 88, "rhythm": "sinus"}')
    assert problems == [] and value == Vitals(heart_rate=88, rhythm="sinus")
    _, problems = schema.validate('{"heart_rate": 999, "rhythm": "sinus"}')
    assert [p.redacted() for p in problems] == ["heart_rate: maximum"]


def test_validation_problems_do_not_leak_values_when_redacted() -> None:
    schema = OutputSchema.build({"type": "object", "properties": {"n": {"type": "integer"}}})
    _, problems = schema.validate('{"n": "Jane Doe"}')
    assert "Jane Doe" in problems[0].message  # the model is shown its mistake
    assert "Jane Doe" not in problems[0].redacted()  # logs and errors are not


def test_fenced_json_is_accepted_and_garbage_is_reported() -> None:
    schema = OutputSchema.build({"type": "object"})
    assert schema.validate('```json\n{"a": 1}\n```') == ({"a": 1}, [])
    _, problems = schema.validate("not json")
    assert problems and problems[0].keyword == "json"


@pytest.mark.parametrize("bad", [{"type": "strin"}, {"type": "string"}, "nope"])
def test_bad_schemas_are_refused(bad: object) -> None:
    with pytest.raises(InvalidRequestError):
        OutputSchema.build(bad)  # type: ignore[arg-type]


def test_bounded_schema_still_accepts_what_the_original_accepts() -> None:
    original = {"type": "object", "properties": {"s": {"type": "string"}}}
    bounded = OutputSchema.build(original).schema
    document = {"s": "ok"}
    jsonschema.validate(document, original)
    jsonschema.validate(document, bounded)
    assert json.loads(json.dumps(bounded))["properties"]["s"]["maxLength"] == 2000


def test_missing_required_field_is_named_without_values() -> None:
    _, problems = OutputSchema.build(Vitals).validate('{"heart_rate": 80}')
    assert [p.redacted() for p in problems] == ["rhythm: required"]


def test_calibrated_lower_bound_closes_the_blind_band() -> None:
    """A server whose real window is 4096 while 8192 was sent reads 4096 of ~5000 tokens."""
    estimator = TokenEstimator()
    calibration = _request("word " * 400)
    size = estimator.measure(calibration, None)
    estimator.observe(size, 2000 // 4 + size.overhead)  # the backend: 4 chars a token
    long = estimator.measure(_request("x" * 20000), None)
    with pytest.raises(SilentTruncationError):
        check_not_truncated(long, 4096, 8192)
    uncalibrated = TokenEstimator().measure(_request("x" * 20000), None)
    check_not_truncated(uncalibrated, 4096, 8192)  # chars/6 alone cannot tell


def test_a_low_count_for_a_prompt_that_cannot_overflow_is_not_truncation() -> None:
    """Some Ollama releases count only the uncached part of a repeated prompt."""
    size = TokenEstimator().measure(_request("y" * 3000), None)
    check_not_truncated(size, 40, 8192)


@pytest.mark.parametrize("run", ["\n" * 3000, " \t" * 1500, '{"a": 1,' + " " * 3000])
def test_whitespace_runaway_is_stopped(run: str) -> None:
    assert _first_trip(run) is not None
    assert _first_trip(run) <= 256 + 40


def test_blank_lines_and_indentation_do_not_trip() -> None:
    text = "Plan:\n\n" + "".join(f"    - item {i}\n\n" for i in range(30)) + " " * 120 + "end"
    assert _first_trip(text) is None


@pytest.mark.parametrize(
    ("ref", "message"),
    [("https://example.org/s.json", "not local"), ("#/$defs/Missing", "points nowhere")],
)
def test_schema_refs_must_resolve_inside_the_schema(ref: str, message: str) -> None:
    schema = {"type": "object", "properties": {"a": {"$ref": ref}}, "$defs": {"B": {}}}
    with pytest.raises(InvalidRequestError, match=message):
        OutputSchema.build(schema)


def test_local_refs_are_accepted_and_validated() -> None:
    schema = OutputSchema.build(
        {
            "type": "object",
            "properties": {"dose": {"$ref": "#/$defs/Dose"}},
            "$defs": {"Dose": {"type": "object", "properties": {"mg": {"type": "number"}}}},
        }
    )
    assert schema.validate('{"dose": {"mg": 5}}')[1] == []
    assert [p.redacted() for p in schema.validate('{"dose": {"mg": "five"}}')[1]] == [
        "dose/mg: type"
    ]
