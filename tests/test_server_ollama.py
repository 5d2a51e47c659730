"""The Ollama dialect, checked with the official `ollama` client over loopback on the tiny model.

Random weights: the tests assert relations (the server equals the engine called
directly, streamed equals non-streamed, JSON validates, counts and timings add
up), never particular words.
"""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import ollama
import pytest

from coheara import Engine, model_facts
from samples import SYSTEM, TRIAGE_SCHEMA, noise_png

MODEL = "medgemma"
PROMPT = "Summarise: fever and productive cough for three days."
OPTIONS = {"num_predict": 12}


@pytest.fixture(scope="module")
def engine(tiny_engine: Engine) -> Engine:
    return tiny_engine


@pytest.fixture(scope="module")
def url(tiny_server: str) -> str:
    return tiny_server


@pytest.fixture(scope="module")
def client(url: str) -> ollama.Client:
    return ollama.Client(host=url, timeout=60)


def direct(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def assert_final_evidence(final: Any, expected: Any) -> None:
    """Ollama's closing fields: integer nanoseconds that add up, counts equal to the engine's."""
    assert final.done is True
    assert final.done_reason in ("stop", "length")
    assert final.prompt_eval_count == expected.prompt_tokens
    assert final.eval_count == expected.output_tokens
    for name in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(final, name), int), name
    assert final.total_duration > 0
    assert final.prompt_eval_duration + final.eval_duration <= final.total_duration
    assert datetime.fromisoformat(final.created_at.replace("Z", "+00:00"))


def test_chat_equals_the_engine(client: ollama.Client, engine: Engine) -> None:
    reply = client.chat(
        model=MODEL,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}],
        options=OPTIONS,
    )
    expected = direct(engine.generate(PROMPT, system=SYSTEM, max_tokens=12))
    assert reply.message.role == "assistant"
    assert reply.message.content == expected.text
    assert reply.model == MODEL
    assert_final_evidence(reply, expected)
    assert reply.done_reason == ("length" if expected.finish_reason != "stop" else "stop")


def test_streaming_chat_concatenates_to_the_non_streamed_reply(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    whole = client.chat(model=MODEL, messages=messages, options=OPTIONS)
    chunks = list(client.chat(model=MODEL, messages=messages, options=OPTIONS, stream=True))
    assert len(chunks) >= 2
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert "".join(c.message.content or "" for c in chunks) == whole.message.content
    final = chunks[-1]
    assert final.prompt_eval_count == whole.prompt_eval_count
    assert final.eval_count == whole.eval_count
    assert final.done_reason == whole.done_reason


def test_generate_with_system_equals_the_engine(client: ollama.Client, engine: Engine) -> None:
    reply = client.generate(model=MODEL, prompt=PROMPT, system=SYSTEM, options=OPTIONS)
    expected = direct(engine.generate(PROMPT, system=SYSTEM, max_tokens=12))
    assert reply.response == expected.text
    assert_final_evidence(reply, expected)
    streamed = list(
        client.generate(model=MODEL, prompt=PROMPT, system=SYSTEM, options=OPTIONS, stream=True)
    )
    assert "".join(c.response or "" for c in streamed) == reply.response


def test_an_image_is_read_and_costs_its_tokens(client: ollama.Client, engine: Engine) -> None:
    image = noise_png(4, (56, 40))
    with_image = client.chat(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT, "images": [image]}],
        options={"num_predict": 4},
    )
    text_only = client.chat(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], options={"num_predict": 4}
    )
    expected = direct(engine.generate(PROMPT, images=[image], max_tokens=4))
    assert with_image.message.content == expected.text
    assert with_image.prompt_eval_count == expected.prompt_tokens
    extra = with_image.prompt_eval_count - text_only.prompt_eval_count
    assert model_facts.IMAGE_SOFT_TOKENS <= extra <= model_facts.IMAGE_PROMPT_TOKENS + 8
    generated = client.generate(
        model=MODEL, prompt=PROMPT, images=[image], options={"num_predict": 4}
    )
    assert generated.prompt_eval_count == expected.prompt_tokens


def test_format_schema_returns_json_that_validates(client: ollama.Client, engine: Engine) -> None:
    reply = client.chat(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        format=TRIAGE_SCHEMA,
        options={"num_predict": 40},
    )
    value = json.loads(reply.message.content or "")
    jsonschema.validate(value, TRIAGE_SCHEMA)
    expected = direct(engine.extract(PROMPT, schema=TRIAGE_SCHEMA, max_tokens=40))
    assert value == expected.value
    streamed = list(
        client.chat(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPT}],
            format=TRIAGE_SCHEMA,
            options={"num_predict": 40},
            stream=True,
        )
    )
    assert json.loads("".join(c.message.content or "" for c in streamed)) == value


def test_format_json_returns_an_object_or_a_clear_error(client: ollama.Client) -> None:
    # Any object is allowed, so random weights may run past num_predict: then the reply is
    # refused (422), never handed over as text that is not JSON.
    try:
        reply = client.generate(
            model=MODEL, prompt=PROMPT, format="json", options={"num_predict": 40}
        )
    except ollama.ResponseError as error:
        assert error.status_code == 422 and "schema" in error.error
    else:
        assert isinstance(json.loads(reply.response), dict)


def test_show_reports_vision_and_the_context_length(client: ollama.Client) -> None:
    info = client.show(MODEL)
    assert "completion" in (info.capabilities or [])
    assert "vision" in (info.capabilities or [])
    model_info = info.modelinfo or {}
    assert model_info["general.architecture"] == "gemma3"
    assert model_info["gemma3.context_length"] == model_facts.CONTEXT_LENGTH
    assert info.details is not None and info.details.family == "gemma3"
    assert f"num_ctx {model_facts.CONTEXT_LENGTH}" in (info.parameters or "")


def test_list_and_ps_name_the_served_model(client: ollama.Client, tiny_model_dir: Path) -> None:
    models = client.list().models
    names = [m.model for m in models]
    assert names[0] == f"{tiny_model_dir.name}:latest"  # the folder's name, never its path
    assert not any(str(tiny_model_dir) in (name or "") for name in names)
    assert "medgemma:latest" in names
    assert model_facts.DEFAULT_OLLAMA_MODEL in names  # an Ollama-configured app works unchanged
    assert len({m.digest for m in models}) == 1  # aliases of one model
    running = client.ps().models
    assert len(running) == 1 and running[0].context_length == model_facts.CONTEXT_LENGTH
    assert running[0].model == names[0]
    for name in (names[0], str(tiny_model_dir)):  # the folder name and the full path
        reply = client.generate(model=name, prompt=PROMPT, options={"num_predict": 1})
        assert reply.done and reply.model == name


def test_the_spec_model_id_is_accepted(client: ollama.Client) -> None:
    reply = client.chat(
        model=model_facts.DEFAULT_OLLAMA_MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        options={"num_predict": 2},
    )
    assert reply.model == model_facts.DEFAULT_OLLAMA_MODEL and reply.done


def test_an_unknown_model_is_a_404(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as chat_error:
        client.chat(model="llama3:8b", messages=[{"role": "user", "content": PROMPT}])
    assert chat_error.value.status_code == 404
    assert 'model "llama3:8b" not found' in chat_error.value.error
    with pytest.raises(ollama.ResponseError) as stream_error:
        list(client.generate(model="llama3:8b", prompt=PROMPT, stream=True))
    assert stream_error.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as show_error:
        client.show("llama3:8b")
    assert show_error.value.status_code == 404


def test_bad_input_is_a_400_with_ollama_shape(url: str, client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as bad_image:
        client.chat(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPT, "images": ["bm90IGFuIGltYWdl"]}],
        )
    assert bad_image.value.status_code == 400
    raw = httpx.post(url + "/api/chat", json={"model": MODEL, "messages": "nope"})
    assert raw.status_code == 400
    assert set(raw.json()) == {"error"} and isinstance(raw.json()["error"], str)
    tools = httpx.post(
        url + "/api/chat",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPT}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
    )
    assert tools.status_code == 400 and "does not support tools" in tools.json()["error"]


def test_a_mid_stream_error_is_the_last_line(url: str, client: ollama.Client) -> None:
    # Two tokens cannot hold a valid object: the stream has begun when validation fails.
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "format": TRIAGE_SCHEMA,
        "options": {"num_predict": 2},
    }
    response = httpx.post(url + "/api/chat", json=body, timeout=60)
    assert response.status_code == 200
    last = json.loads(response.text.splitlines()[-1])
    assert set(last) == {"error"} and "schema" in last["error"]
    with pytest.raises(ollama.ResponseError):
        list(client.chat(**body, stream=True))
    status = httpx.post(url + "/api/chat", json={**body, "stream": False}, timeout=60)
    assert status.status_code == 422 and set(status.json()) == {"error"}


def test_num_ctx_is_accepted_and_the_deployment_window_applies(client: ollama.Client) -> None:
    plain = client.generate(model=MODEL, prompt=PROMPT, options=OPTIONS)
    other = client.generate(model=MODEL, prompt=PROMPT, options={**OPTIONS, "num_ctx": 2048})
    assert other.response == plain.response
    assert other.prompt_eval_count == plain.prompt_eval_count


def test_an_empty_prompt_loads_the_model(client: ollama.Client) -> None:
    reply = client.generate(model=MODEL, prompt="")
    assert reply.done is True and reply.done_reason == "load" and reply.response == ""
    unloaded = client.chat(model=MODEL, messages=[], keep_alive=0)
    assert unloaded.done_reason == "unload"


def test_version_and_root(url: str) -> None:
    version = httpx.get(url + "/api/version").json()["version"]
    assert [int(p) for p in version.split(".")] >= [0, 5, 0]
    assert httpx.get(url + "/").status_code == 200


def test_images_as_plain_base64_strings(url: str) -> None:
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "images": [base64.b64encode(noise_png(5, (56, 40))).decode()],
        "stream": False,
        "options": {"num_predict": 2},
    }
    response = httpx.post(url + "/api/generate", json=body, timeout=60)
    assert response.status_code == 200
    assert response.json()["prompt_eval_count"] > model_facts.IMAGE_SOFT_TOKENS
