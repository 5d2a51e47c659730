"""The OpenAI dialect, checked with the official `openai` client over loopback on the tiny model.

Random weights: the tests assert relations (the server equals the engine called
directly, streamed equals non-streamed, JSON validates, usage adds up), never words.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from coheara import Engine, model_facts
from coheara.engine import InputMessage
from coheara.imaging import load_image
from samples import SYSTEM, TRIAGE_SCHEMA, noise_png

MODEL = "medgemma"
PROMPT = "Summarise: shortness of breath on exertion, bilateral lower limb oedema."


@pytest.fixture(scope="module")
def engine(tiny_engine: Engine) -> Engine:
    return tiny_engine


@pytest.fixture(scope="module")
def url(tiny_server: str) -> str:
    return tiny_server


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


def direct(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def test_chat_equals_the_engine(client: openai.OpenAI, engine: Engine) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": SYSTEM}, user(PROMPT)],
        max_tokens=12,
    )
    expected = direct(engine.generate(PROMPT, system=SYSTEM, max_tokens=12))
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == ("stop" if expected.finish_reason == "stop" else "length")
    assert completion.model == MODEL
    assert completion.object == "chat.completion"
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == expected.prompt_tokens
    assert usage.completion_tokens == expected.output_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_developer_role_is_system_text(client: openai.OpenAI) -> None:
    as_system = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": SYSTEM}, user(PROMPT)], max_tokens=6
    )
    as_developer = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "developer", "content": SYSTEM}, user(PROMPT)],
        max_tokens=6,
    )
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content
    assert as_developer.usage and as_system.usage
    assert as_developer.usage.prompt_tokens == as_system.usage.prompt_tokens


def test_max_completion_tokens_wins_over_max_tokens(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=[user(PROMPT)], max_tokens=12, max_completion_tokens=3
    )
    assert completion.usage is not None
    assert completion.usage.completion_tokens <= 3
    if completion.choices[0].finish_reason == "length":
        assert completion.usage.completion_tokens == 3


def test_streaming_with_usage_concatenates_to_the_non_streamed_reply(
    client: openai.OpenAI,
) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=[user(PROMPT)], max_tokens=12)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[user(PROMPT)],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert all(f is None for f in finishes[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and whole.usage is not None
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_without_usage_sends_none(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=[user(PROMPT)], max_tokens=4, stream=True
        )
    )
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason


def test_an_image_part_is_read(client: openai.OpenAI, engine: Engine) -> None:
    image = noise_png(6, (70, 30))
    encoded = base64.b64encode(image).decode()
    parts: list[Any] = [
        {"type": "text", "text": PROMPT},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded}"}},
    ]
    completion = client.chat.completions.create(model=MODEL, messages=[user(parts)], max_tokens=4)
    # The text came first: the order is kept, as a volume's labelled slices need.
    in_order = [InputMessage.from_parts("user", [PROMPT, load_image(image)])]
    expected = direct(engine.generate(messages=in_order, max_tokens=4))
    assert completion.choices[0].message.content == expected.text
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == expected.prompt_tokens
    bare = [parts[0], {"type": "image_url", "image_url": {"url": encoded}}]
    again = client.chat.completions.create(model=MODEL, messages=[user(bare)], max_tokens=4)
    assert again.usage is not None and again.usage.prompt_tokens == expected.prompt_tokens
    # Image first, then text: the plain form every backend takes.
    image_first = client.chat.completions.create(
        model=MODEL, messages=[user([parts[1], parts[0]])], max_tokens=4
    )
    plain = direct(engine.generate(PROMPT, images=[image], max_tokens=4))
    assert image_first.choices[0].message.content == plain.text


def test_a_remote_image_url_is_refused_not_fetched(client: openai.OpenAI) -> None:
    parts: list[Any] = [
        {"type": "text", "text": PROMPT},
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}},
    ]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=[user(parts)])
    assert error.value.code == "invalid_image"


def test_response_format_json_schema_is_validated(client: openai.OpenAI, engine: Engine) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[user(PROMPT)],
        max_tokens=40,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "triage", "schema": TRIAGE_SCHEMA, "strict": True},
        },
    )
    value = json.loads(completion.choices[0].message.content or "")
    jsonschema.validate(value, TRIAGE_SCHEMA)
    expected = direct(engine.extract(PROMPT, schema=TRIAGE_SCHEMA, max_tokens=40))
    assert value == expected.value
    streamed = client.chat.completions.create(
        model=MODEL,
        messages=[user(PROMPT)],
        max_tokens=40,
        stream=True,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "t", "schema": TRIAGE_SCHEMA},
        },
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert json.loads(text) == value


def test_response_format_json_object_is_an_object_or_a_clear_error(
    client: openai.OpenAI,
) -> None:
    try:
        completion = client.chat.completions.create(
            model=MODEL,
            messages=[user(PROMPT)],
            max_tokens=40,
            response_format={"type": "json_object"},
        )
    except openai.UnprocessableEntityError as error:
        assert error.status_code == 422 and "schema" in error.message
    else:
        assert isinstance(json.loads(completion.choices[0].message.content or ""), dict)


def test_sampling_with_a_seed_is_reproducible(client: openai.OpenAI) -> None:
    def ask() -> str | None:
        return (
            client.chat.completions.create(
                model=MODEL, messages=[user(PROMPT)], max_tokens=8, temperature=1.0, seed=11
            )
            .choices[0]
            .message.content
        )

    assert ask() == ask()


def test_models_list_and_retrieve(client: openai.OpenAI, tiny_model_dir: Path) -> None:
    models = list(client.models.list())
    ids = [m.id for m in models]
    assert ids[0] == tiny_model_dir.name  # the weights folder's name, never its path
    assert str(tiny_model_dir) not in ids
    assert MODEL in ids and model_facts.DEFAULT_HF_MODEL in ids
    assert {getattr(m, "root", None) for m in models} == {tiny_model_dir.name}
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    by_path = client.chat.completions.create(
        model=str(tiny_model_dir), messages=[user(PROMPT)], max_tokens=1
    )
    assert by_path.choices[0].finish_reason in ("stop", "length")


def test_an_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-4o", messages=[user(PROMPT)])
    assert error.value.status_code == 404
    assert error.value.code == "model_not_found"
    body = error.value.body
    assert isinstance(body, dict) and body["param"] == "model"
    assert body["type"] == "invalid_request_error"


def test_a_mid_stream_error_is_an_error_event(client: openai.OpenAI) -> None:
    # Two tokens cannot hold a valid object: the stream has begun when validation fails.
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[user(PROMPT)],
        max_tokens=2,
        stream=True,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "t", "schema": TRIAGE_SCHEMA},
        },
    )
    with pytest.raises(openai.APIError) as error:
        list(stream)
    assert "schema" in error.value.message
    # 422, not 5xx: the client would retry a 5xx, and greedy decoding fails the same way.
    with pytest.raises(openai.UnprocessableEntityError) as status:
        client.chat.completions.create(
            model=MODEL,
            messages=[user(PROMPT)],
            max_tokens=2,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "t", "schema": TRIAGE_SCHEMA},
            },
        )
    assert status.value.status_code == 422
    assert status.value.code == "output_invalid"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
    ],
)
def test_unsupported_options_are_400(
    client: openai.OpenAI, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=[user(PROMPT)], **extra)
    body = error.value.body
    assert isinstance(body, dict) and body["param"] == param


def test_an_invalid_body_is_400_in_openai_shape(url: str) -> None:
    response = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "messages"
    assert set(error) == {"message", "type", "param", "code"}


# ----- the wire itself: the keys strict clients rely on ------------------------------------


def sse_events(response: httpx.Response) -> list[Any]:
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e.strip()]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_a_completion_has_every_key_openai_sends(url: str, engine: Engine) -> None:
    response = httpx.post(
        url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [user(PROMPT)], "max_tokens": 6},
        timeout=60,
    )
    body = response.json()
    expected = direct(engine.generate(PROMPT, max_tokens=6))
    assert {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"} <= set(
        body
    )
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == MODEL
    choice = body["choices"][0]
    assert set(choice) == {"index", "message", "logprobs", "finish_reason"}
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] == ("stop" if expected.finish_reason == "stop" else "length")
    assert choice["message"] == {"role": "assistant", "content": expected.text, "refusal": None}
    assert body["usage"] == {
        "prompt_tokens": expected.prompt_tokens,
        "completion_tokens": expected.output_tokens,
        "total_tokens": expected.prompt_tokens + expected.output_tokens,
    }


@pytest.mark.parametrize("include_usage", [False, True])
def test_every_chunk_choice_carries_logprobs_and_finish_reason(
    url: str, include_usage: bool
) -> None:
    response = httpx.post(
        url + "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [user(PROMPT)],
            "max_tokens": 6,
            "stream": True,
            "stream_options": {"include_usage": include_usage},
        },
        timeout=60,
    )
    chunks = sse_events(response)
    with_choices = [c for c in chunks if c["choices"]]
    assert len(with_choices) >= 3  # the role, at least one delta, the finish
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert {"id", "created", "model", "system_fingerprint"} <= set(chunk)
        assert ("usage" in chunk) is include_usage
    for chunk in with_choices:
        (choice,) = chunk["choices"]
        assert set(choice) == {"index", "delta", "logprobs", "finish_reason"}
        assert choice["index"] == 0 and choice["logprobs"] is None
    finishes = [c["choices"][0]["finish_reason"] for c in with_choices]
    assert finishes[:-1] == [None] * (len(finishes) - 1)
    assert finishes[-1] in ("stop", "length")
    assert with_choices[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert with_choices[-1]["choices"][0]["delta"] == {}
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in with_choices[1:-1])
    assert "coheara" in with_choices[-1]
    assert not any("coheara" in c for c in with_choices[:-1])
    if include_usage:
        assert all(c["usage"] is None for c in chunks[:-1])
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
