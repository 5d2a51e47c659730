"""Images at the request level: counts checked before decoding, provenance in every result,
series, pairs and interleaved slices through the engine and each server dialect.

The tiny model's weights are random: the tests compare the server with the engine called
directly on the same prepared images (same prompt tokens, same greedy text), and check the
evidence values (recipe, slice numbers, warnings), never particular words.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from coheara import Engine, Settings
from coheara.errors import ImageError, RequestTooLargeError
from coheara.imaging import load_image, prepare
from coheara.imaging.prepare import PAIR_INSTRUCTION, prepare_pair
from coheara.imaging.volume import volume_messages
from coheara.server import create_app
from servers import serve
from test_volume import assert_no_canary, dataset, hu_of, red_of, write_series

QUESTION = "Any interval change?"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def run(coroutine: Any) -> Any:
    import asyncio

    return asyncio.run(coroutine)


@pytest.fixture(scope="module")
def engine(tiny_engine: Engine) -> Engine:
    return Engine(tiny_engine.backend, Settings(max_output_tokens=4, max_images=4))


@pytest.fixture(scope="module")
def url(engine: Engine) -> Iterator[str]:
    with serve(create_app(engine)) as address:
        yield address


@pytest.fixture(scope="module")
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("series")
    write_series(folder, 3)
    return folder


# ----- counts, before anything is decoded ---------------------------------------------------


def test_the_engine_refuses_too_many_images_before_decoding_any(engine: Engine) -> None:
    junk = [b"not an image"] * 5  # decoding the first would fail with another message
    with pytest.raises(RequestTooLargeError, match="5 images; at most 4"):
        run(engine.generate("Describe.", images=junk))


@pytest.mark.parametrize("dialect", ["native", "ollama", "openai"])
def test_every_dialect_refuses_too_many_images_before_decoding_any(
    http: httpx.Client, dialect: str
) -> None:
    junk = "%%%not-base64%%%"
    if dialect == "native":
        response = http.post("/v1/generate", json={"prompt": "x", "images": [junk] * 5})
        assert response.json()["error"]["code"] == "request_too_large"
    elif dialect == "ollama":
        response = http.post(
            "/api/generate",
            json={"model": "medgemma", "prompt": "x", "images": [junk] * 5, "stream": False},
        )
    else:
        part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{junk}"}}
        response = http.post(
            "/v1/chat/completions",
            json={"model": "medgemma", "messages": [{"role": "user", "content": [part] * 5}]},
        )
    assert response.status_code == 413
    assert "5 images; at most 4" in response.text


def test_prepare_counts_what_it_made(series: Path) -> None:
    from coheara.imaging.limits import ImageLimits

    with pytest.raises(RequestTooLargeError, match="3 images; at most 2"):
        prepare(series, image_limits=ImageLimits(max_images=2))
    assert len(prepare(series).images) == 3


# ----- evidence ------------------------------------------------------------------------------


def test_each_images_provenance_and_warnings_reach_the_result(engine: Engine) -> None:
    pixels = np.full((8, 8), hu_of(30) + 1024, dtype=np.uint16)
    ct = dataset(pixels, series_uid="1.2.3", position=(0, 0, 0))
    from pydicom import dcmread

    marked = dcmread(io.BytesIO(ct))
    marked.BurnedInAnnotation = "YES"
    buffer = io.BytesIO()
    marked.save_as(buffer)
    result = run(engine.generate("Describe.", images=[buffer.getvalue(), png((9, 9, 9))]))
    first, second = result.images
    assert first["recipe"] == "ct_windows" and first["modality"] == "CT"
    assert [list(w) for w in first["window"]] == [[-1024, 1024], [-135, 215], [0, 80]]
    assert second["kind"] != "dicom"
    assert any("burned-in annotation" in w for w in result.warnings)
    assert_no_canary(result.model_dump_json())


def test_a_volumes_order_and_sampling_reach_the_result(engine: Engine, series: Path) -> None:
    volume = prepare(series, max_slices=2)
    result = run(engine.generate(messages=volume.messages("Describe.")))
    assert [image["slice_number"] for image in result.images] == [1, 2]
    assert [image["order_index"] for image in result.images] == [0, 2]
    assert "3 slices sampled evenly to 2" in result.warnings


# ----- pairs ---------------------------------------------------------------------------------


def test_a_pair_is_sent_prior_first_each_labelled() -> None:
    pair = prepare_pair(png((200, 0, 0)), png((0, 0, 200)))
    [message] = pair.messages(QUESTION)
    texts = [p for p in message.parts if isinstance(p, str)]
    assert texts == [PAIR_INSTRUCTION, "PRIOR:", "CURRENT:", QUESTION]
    prior, current = (p for p in message.parts if not isinstance(p, str))
    assert tuple(prior.pixels[0, 0]) == (0, 0, 200) and prior.source == "prior"
    assert tuple(current.pixels[0, 0]) == (200, 0, 0) and current.source == "current"
    assert message.parts.index(prior) == message.parts.index("PRIOR:") + 1


def test_a_pair_takes_one_image_per_study(series: Path) -> None:
    with pytest.raises(ImageError, match="prior study gives 3 images"):
        prepare_pair(png((1, 1, 1)), series)


# ----- the native study -------------------------------------------------------------------


def _files(folder: Path) -> list[str]:
    return [b64(path.read_bytes()) for path in sorted(folder.iterdir())]


def test_a_series_study_equals_the_engine_on_the_prepared_volume(
    http: httpx.Client, engine: Engine, series: Path
) -> None:
    body = {"prompt": QUESTION, "study": {"files": _files(series)}, "max_tokens": 4}
    answer = http.post("/v1/generate", json=body).json()
    expected = run(engine.generate(messages=prepare(series).messages(QUESTION)))
    assert answer["prompt_tokens"] == expected.prompt_tokens
    assert answer["text"] == expected.text
    assert [image["slice_number"] for image in answer["images"]] == [1, 2, 3]
    positions = [image["position"] for image in answer["images"]]
    assert positions == sorted(positions)


def test_a_study_window_and_a_pair_reach_the_model(
    http: httpx.Client, engine: Engine, series: Path
) -> None:
    one = sorted(series.iterdir())[0]
    body = {"prompt": QUESTION, "study": {"files": [b64(one.read_bytes())], "preset": "lung"}}
    answer = http.post("/v1/generate", json=body).json()
    assert answer["images"][0]["preset"] == "lung" and answer["images"][0]["recipe"] == "preset"
    pair = {"files": [b64(png((200, 0, 0)))], "prior": b64(png((0, 0, 200)))}
    answer = http.post("/v1/generate", json={"prompt": QUESTION, "study": pair}).json()
    expected = run(
        engine.generate(
            messages=prepare_pair(png((200, 0, 0)), png((0, 0, 200))).messages(QUESTION)
        )
    )
    assert answer["prompt_tokens"] == expected.prompt_tokens and answer["text"] == expected.text


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"prompt": QUESTION, "study": {"files": []}}, "validation_error"),
        ({"study": {"files": ["aGVsbG8="]}}, "invalid_request"),
        ({"prompt": QUESTION, "study": {"files": ["%%%"]}}, "invalid_image"),
        ({"prompt": QUESTION, "study": {"files": ["aGVsbG8="]}, "images": ["aGVsbG8="]}, None),
        ({"prompt": QUESTION, "study": {"files": ["aGVsbG8="], "preset": "sinus"}}, None),
    ],
)
def test_a_bad_study_is_a_clear_4xx(
    http: httpx.Client, body: dict[str, Any], code: str | None
) -> None:
    response = http.post("/v1/generate", json=body)
    assert response.status_code == (422 if code == "validation_error" else 400)
    assert response.json()["error"]["code"] == code or code is None


# ----- the OpenAI dialect keeps content order -------------------------------------------------


def test_openai_parts_keep_a_volumes_slice_labels_in_order(
    url: str, engine: Engine, series: Path
) -> None:
    volume = prepare(series)
    [message] = volume_messages(QUESTION, volume.volume)
    content: list[Any] = []
    for part in message.parts:
        if isinstance(part, str):
            content.append({"type": "text", "text": part})
        else:
            uri = "data:image/png;base64," + part.base64_png()
            content.append({"type": "image_url", "image_url": {"url": uri}})
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    completion = client.chat.completions.create(
        model="medgemma", messages=[{"role": "user", "content": content}], max_tokens=4
    )
    expected = run(engine.generate(messages=[message], max_tokens=4))
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == expected.prompt_tokens
    assert completion.choices[0].message.content == expected.text
    # The PNG on the wire carries the prepared pixels exactly.
    decoded = load_image(content[1]["image_url"]["url"])
    assert int(decoded.pixels[448, 448, 0]) == red_of(0)


# ----- tiles and pages through prepare ---------------------------------------------------------


def test_prepare_tiles_a_slide_into_labelled_patches_in_spatial_order() -> None:
    slide = np.full((896 * 2, 896 * 2, 3), 255, np.uint8)  # white background
    texture = np.random.default_rng(3).integers(0, 40, (896, 896, 1), dtype=np.uint8)
    slide[:896, 896:] = texture + np.array([150, 40, 120], np.uint8)  # tissue: row 1, column 2
    slide[896:, :896] = texture + np.array([90, 20, 140], np.uint8)  # tissue: row 2, column 1
    prepared = prepare(slide, tiles=True)
    assert prepared.kind == "tiles" and len(prepared.images) == 2
    assert prepared.labels() == ["PATCH 1 (row 1, column 2)", "PATCH 2 (row 2, column 1)"]
    assert np.array_equal(prepared.images[0].pixels, slide[:896, 896:])
    [message] = prepared.messages(QUESTION)
    assert message.parts[-1] == QUESTION and message.parts[2] == "PATCH 1 (row 1, column 2)"
    assert prepared.summary()["skipped_background"] == 2
    with pytest.raises(ImageError, match="one large picture"):
        prepare([png((1, 1, 1))] * 2, tiles=True)


def test_prepare_gives_every_page_of_a_multi_page_tiff() -> None:
    buffer = io.BytesIO()
    first, second = Image.new("RGB", (20, 20), (250, 0, 0)), Image.new("RGB", (20, 20), (0, 250, 0))
    first.save(buffer, format="TIFF", save_all=True, append_images=[second])
    prepared = prepare(buffer.getvalue())
    assert prepared.kind == "images"
    assert [tuple(i.pixels[0, 0]) for i in prepared.images] == [(250, 0, 0), (0, 250, 0)]


# ----- named header codes, only when asked ---------------------------------------------------


def _radiograph(**tags: str) -> bytes:
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(dataset(np.zeros((8, 8)), series_uid="1.2.9", modality="CT")))
    ds.Modality = "CR"
    for name, value in tags.items():
        setattr(ds, name, value)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def _texts(messages: list[Any]) -> str:
    return " ".join(
        [m.text for m in messages] + [p for m in messages for p in m.parts if isinstance(p, str)]
    )


def test_header_codes_reach_the_prompt_only_when_named() -> None:
    film = prepare(_radiograph(BodyPartExamined="CHEST", ViewPosition="PA"))
    assert "CHEST" not in _texts(film.messages(QUESTION))  # only pixels by default
    named = film.messages(QUESTION, header_fields=["modality", "body_part", "view_position"])
    assert named[-1].text == (
        f"Image details: image 1: modality CR, body part CHEST, view PA.\n{QUESTION}"
    )
    assert film.images[0].provenance.body_part == "CHEST"
    free_text = prepare(_radiograph(BodyPartExamined="chest of CANARY Doe, left side"))
    assert free_text.images[0].provenance.body_part is None  # not a code: dropped
    assert free_text.header_text(["body_part"]) == ""
    with pytest.raises(ImageError, match="unknown header field 'PatientName'"):
        film.header_text(["PatientName"])


def test_a_series_states_its_codes_once(series: Path) -> None:
    volume = prepare(series)
    text = volume.header_text(["modality"])
    assert text == "Image details: series: modality CT."


def test_the_native_study_takes_header_fields(http: httpx.Client, engine: Engine) -> None:
    film = _radiograph(BodyPartExamined="CHEST", ViewPosition="AP")
    study = {"files": [b64(film)], "header_fields": ["body_part", "view_position"]}
    answer = http.post("/v1/generate", json={"prompt": QUESTION, "study": study}).json()
    messages = prepare(film).messages(QUESTION, header_fields=["body_part", "view_position"])
    expected = run(engine.generate(messages=messages))
    assert answer["prompt_tokens"] == expected.prompt_tokens and answer["text"] == expected.text
    plain = http.post("/v1/generate", json={"prompt": QUESTION, "study": {"files": [b64(film)]}})
    assert plain.json()["prompt_tokens"] < answer["prompt_tokens"]
    refused = http.post(
        "/v1/generate",
        json={"prompt": QUESTION, "study": {"files": [b64(film)], "header_fields": ["name"]}},
    )
    assert refused.status_code == 422
