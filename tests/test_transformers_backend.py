"""The in-process Transformers backend on the tiny random-weight MedGemma-architecture model.

Everything here runs the real pipeline (chat template, processor with 896x896
images and 256 soft tokens, Gemma 3 generation, xgrammar constraint) on CPU.
Random weights make the text meaningless, so the tests check values that do not
depend on meaning: exact counts, agreement with a direct `generate` call,
determinism, schema validity, stop reasons, cancellation and serialization.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from pydantic import BaseModel, Field

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("xgrammar")

from coheara import Engine, model_facts  # noqa: E402
from coheara.backends import transformers_backend as tb  # noqa: E402
from coheara.backends.base import ChatRequest, GenerationOptions, Message  # noqa: E402
from coheara.backends.transformers_backend import TransformersBackend  # noqa: E402
from coheara.errors import (  # noqa: E402
    BackendError,
    ConfigurationError,
    ContextOverflowError,
    InvalidRequestError,
    ModelNotFoundError,
)
from coheara.imaging import PreparedImage, load_image  # noqa: E402
from coheara.settings import load_settings  # noqa: E402


@pytest.fixture(scope="module")
async def backend(tiny_model_dir: Path) -> Any:
    backend = TransformersBackend(str(tiny_model_dir), device="cpu")
    yield backend
    await backend.aclose()


@pytest.fixture(scope="module")
def reference_model(tiny_model_dir: Path) -> Any:
    """The checkpoint loaded directly, to check the backend against plain `generate`."""
    processor = transformers.AutoProcessor.from_pretrained(tiny_model_dir, local_files_only=True)
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        tiny_model_dir, local_files_only=True, dtype=torch.float32
    ).eval()
    return processor, model


def _image(seed: int) -> PreparedImage:
    pixels = np.random.default_rng(seed).integers(0, 256, (600, 400, 3), dtype=np.uint8)
    return load_image(pixels)


def _request(
    text: str = "Patient with chest pain and fever. Summarise.",
    *,
    images: tuple[PreparedImage, ...] = (),
    schema: dict[str, Any] | None = None,
    **options: Any,
) -> ChatRequest:
    options.setdefault("max_tokens", 12)
    return ChatRequest((Message("user", text, images),), GenerationOptions(**options), schema)


async def _collect(backend: TransformersBackend, request: ChatRequest) -> tuple[list[str], Any]:
    deltas: list[str] = []
    final = None
    async for event in backend.stream(request):
        if event.done:
            final = event
        else:
            deltas.append(event.text)
    assert final is not None
    return deltas, final


class _Recorder:
    """Spies on what the worker thread reports, including for streams nobody reads any more."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.done: list[tuple[str, int | None, int]] = []
        original = tb._Job.send
        recorder = self

        def send(job: Any, kind: str, payload: Any = None) -> None:
            if kind == "done":
                recorder.done.append(payload)
            original(job, kind, payload)

        monkeypatch.setattr(tb._Job, "send", send)


# ----- loading, capabilities, errors ----------------------------------------------------


async def test_capabilities_describe_the_checkpoint(backend: TransformersBackend) -> None:
    caps = await backend.capabilities()
    assert caps.backend == "transformers" and backend.name == "transformers"
    assert caps.model == backend.model
    assert caps.vision is True
    assert caps.context_length == model_facts.CONTEXT_LENGTH
    assert caps.constrained_decoding and caps.exact_token_count
    assert caps.details["dtype"] == "float32"  # auto on CPU: float32, never float16
    assert caps.details["device"] == "cpu"


@pytest.mark.parametrize("dtype", ["float16", "fp16", "half", "torch.float16"])
def test_float16_is_refused(tiny_model_dir: Path, dtype: str) -> None:
    with pytest.raises(ConfigurationError, match="float16"):
        TransformersBackend(str(tiny_model_dir), dtype=dtype)


async def test_bfloat16_on_cpu_loads_and_generates(tiny_model_dir: Path) -> None:
    backend = TransformersBackend(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    try:
        assert (await backend.capabilities()).details["dtype"] == "bfloat16"
        _, final = await _collect(backend, _request(max_tokens=3))
        assert (final.finish_reason, final.output_tokens) == ("length", 3)
        assert backend._hf_model.dtype == torch.bfloat16
    finally:
        await backend.aclose()


async def test_missing_folder_is_model_not_found_with_a_fix(tmp_path: Path) -> None:
    backend = TransformersBackend(str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotFoundError) as caught:
        await backend.capabilities()
    assert "hf download" in str(caught.value)
    with pytest.raises(ModelNotFoundError):
        await _collect(backend, _request())
    health = await backend.health()
    assert health.ok is False and "not found" in health.detail


async def test_folder_without_a_checkpoint_is_model_not_found(tmp_path: Path) -> None:
    (tmp_path / "weights.txt").write_text("not a model")
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        await TransformersBackend(str(tmp_path)).capabilities()


async def test_hub_id_without_download_permission_stays_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    backend = TransformersBackend("google/medgemma-1.5-4b-it", allow_download=False)
    with pytest.raises(ModelNotFoundError, match="downloads are off") as caught:
        await backend.capabilities()
    assert "hf download google/medgemma-1.5-4b-it" in str(caught.value)
    assert "COHEARA_ALLOW_DOWNLOAD=true" in str(caught.value)
    health = await backend.health()
    assert health.ok is False and "downloads are off" in health.detail


def test_an_unusable_device_fails_at_construction(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match="unknown device"):
        TransformersBackend(str(tiny_model_dir), device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigurationError, match="CUDA"):
            TransformersBackend(str(tiny_model_dir), device="cuda")


async def test_health_does_not_raise_and_reports_the_loaded_model(
    backend: TransformersBackend,
) -> None:
    await _collect(backend, _request(max_tokens=1))
    health = await backend.health()
    assert health.ok and "cpu" in health.detail and "float32" in health.detail
    assert health.version == transformers.__version__


# ----- prompt and counts ----------------------------------------------------------------


async def test_prompt_is_the_gemma_format_and_counted_exactly(
    backend: TransformersBackend, reference_model: Any
) -> None:
    processor, _ = reference_model
    request = ChatRequest(
        (
            Message("user", "First question?", system="Be brief."),
            Message("assistant", "An answer."),
            Message("user", "Second question?"),
        ),
        GenerationOptions(max_tokens=2),
    )
    expected = (
        "<bos><start_of_turn>user\nBe brief.\n\nFirst question?<end_of_turn>\n"
        "<start_of_turn>model\nAn answer.<end_of_turn>\n"
        "<start_of_turn>user\nSecond question?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert backend._render(request) == expected
    exact = len(processor.tokenizer(expected, add_special_tokens=False)["input_ids"])
    assert backend.count_prompt_tokens(request) == exact
    _, final = await _collect(backend, request)
    assert final.prompt_tokens == exact  # one <bos>, not two


async def test_ordered_parts_interleave_images_and_labels(
    backend: TransformersBackend,
) -> None:
    """A CT volume as Google's notebooks feed it: each slice followed by its label."""
    first, second = _image(1), _image(2)
    turn = Message.from_parts("user", ("Review.", first, "SLICE 1", second, "SLICE 2", "Q?"))
    request = ChatRequest((turn,), GenerationOptions(max_tokens=1))
    assert backend._render(request) == (
        "<bos><start_of_turn>user\nReview.<start_of_image>SLICE 1<start_of_image>SLICE 2Q?"
        "<end_of_turn>\n<start_of_turn>model\n"
    )
    assert request.images == (first, second)
    _, final = await _collect(backend, request)
    assert final.prompt_tokens == backend.count_prompt_tokens(request)


async def test_system_text_goes_before_the_images_as_the_gemma_template_puts_it(
    backend: TransformersBackend,
) -> None:
    request = ChatRequest(
        (Message("user", "What is shown?", (_image(1),), system="You are a radiologist."),)
    )
    assert backend._render(request) == (
        "<bos><start_of_turn>user\nYou are a radiologist.\n\n<start_of_image>What is shown?"
        "<end_of_turn>\n<start_of_turn>model\n"
    )


async def test_an_image_adds_exactly_its_prompt_cost(backend: TransformersBackend) -> None:
    text_only = _request(max_tokens=1)
    with_image = _request(images=(_image(1),), max_tokens=1)
    with_two = _request(images=(_image(1), _image(2)), max_tokens=1)
    base = backend.count_prompt_tokens(text_only)
    assert base is not None
    assert backend.count_prompt_tokens(with_image) == base + model_facts.IMAGE_PROMPT_TOKENS
    assert backend.count_prompt_tokens(with_two) == base + 2 * model_facts.IMAGE_PROMPT_TOKENS
    _, final = await _collect(backend, with_image)
    assert final.prompt_tokens == base + model_facts.IMAGE_PROMPT_TOKENS


async def test_roles_that_do_not_alternate_are_an_invalid_request(
    backend: TransformersBackend,
) -> None:
    request = ChatRequest((Message("user", "a"), Message("user", "b")))
    with pytest.raises(InvalidRequestError, match="alternate"):
        await _collect(backend, request)


async def test_the_image_placeholder_in_text_is_refused(backend: TransformersBackend) -> None:
    with pytest.raises(InvalidRequestError, match="reserved image token"):
        backend.count_prompt_tokens(_request("look: <start_of_image>", images=(_image(1),)))


async def test_generation_failures_become_backend_errors(
    backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    await backend.chat(_request(max_tokens=1))  # loaded
    model = backend._hf_model
    for failure, message in (
        (torch.cuda.OutOfMemoryError("CUDA out of memory"), "out of GPU memory"),
        (RuntimeError("kernel failed"), "generation failed in Transformers: RuntimeError"),
    ):

        def fail(*args: Any, _error: Exception = failure, **kwargs: Any) -> Any:
            raise _error

        monkeypatch.setattr(model, "generate", fail)
        with pytest.raises(BackendError, match=message):
            await _collect(backend, _request())
    monkeypatch.undo()
    _, final = await _collect(backend, _request(max_tokens=2))  # the worker survived
    assert final.output_tokens == 2


async def test_request_over_the_window_is_refused(backend: TransformersBackend) -> None:
    with pytest.raises(ContextOverflowError):
        await _collect(backend, _request(max_tokens=model_facts.CONTEXT_LENGTH))


# ----- generation ------------------------------------------------------------------------


async def test_greedy_stream_matches_plain_generate(
    backend: TransformersBackend, reference_model: Any
) -> None:
    request = _request(max_tokens=16)
    deltas, final = await _collect(backend, request)
    processor, model = reference_model
    inputs = processor(
        text=[backend._render(request)], add_special_tokens=False, return_tensors="pt"
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert "".join(deltas) == processor.tokenizer.decode(new, skip_special_tokens=True)
    assert final.output_tokens == len(new)
    assert final.prompt_tokens == inputs["input_ids"].shape[1]
    again, _ = await _collect(backend, request)
    assert again == deltas  # deterministic, delta for delta
    text, closing = await backend.chat(request)
    assert text == "".join(deltas) and closing.output_tokens == final.output_tokens


async def test_max_tokens_gives_length_and_the_exact_count(backend: TransformersBackend) -> None:
    _, final = await _collect(backend, _request(max_tokens=5))
    assert (final.finish_reason, final.output_tokens) == ("length", 5)


async def test_the_image_changes_what_the_model_says(backend: TransformersBackend) -> None:
    # Solid images, not noise: pooled SigLIP features of two noise images are nearly equal.
    black = load_image(np.zeros((896, 896, 3), dtype=np.uint8))
    white = load_image(np.full((896, 896, 3), 255, dtype=np.uint8))
    first, _ = await backend.chat(_request(images=(black,), max_tokens=8))
    second, _ = await backend.chat(_request(images=(white,), max_tokens=8))
    plain, _ = await backend.chat(_request(max_tokens=8))
    assert len({first, second, plain}) == 3


async def test_stop_string_cuts_the_text_and_stops(backend: TransformersBackend) -> None:
    full, _ = await backend.chat(_request(max_tokens=24))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop and stop in full
    deltas, final = await _collect(backend, _request(max_tokens=24, stop=(stop,)))
    assert "".join(deltas) == full[: full.index(stop)]
    assert final.finish_reason == "stop" and final.output_tokens < 24


async def test_sampling_is_reproducible_with_a_seed(backend: TransformersBackend) -> None:
    def sampled(seed: int) -> ChatRequest:
        return _request(max_tokens=16, temperature=1.0, top_p=0.95, top_k=40, seed=seed)

    first, _ = await backend.chat(sampled(7))
    again, _ = await backend.chat(sampled(7))
    other, _ = await backend.chat(sampled(8))
    greedy, _ = await backend.chat(_request(max_tokens=16))
    assert first == again
    assert first != other
    assert greedy not in (first, other)


# ----- structured output -------------------------------------------------------------------

SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "urgent": {"type": "boolean"},
        },
        "required": ["age", "urgent"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "codes": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
            "severity": {"enum": ["mild", "moderate", "severe"]},
        },
        "required": ["codes", "severity"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "patient": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "temp_c": {"type": "number", "minimum": 30, "maximum": 45},
                },
                "required": ["name", "temp_c"],
                "additionalProperties": False,
            },
            "note": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]},
        },
        "required": ["patient", "note"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "maxItems": 4},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["scalars", "enum-array", "nested", "array"])
async def test_constrained_decoding_yields_schema_valid_json(
    backend: TransformersBackend, schema: dict[str, Any]
) -> None:
    deltas, final = await _collect(backend, _request(schema=schema, max_tokens=200))
    text = "".join(deltas)
    jsonschema.validate(json.loads(text), schema)
    assert final.finish_reason == "stop"  # the grammar ended it with <end_of_turn>/<eos>
    assert "<end_of_turn>" not in text and "<eos>" not in text


async def test_unconstrained_tiny_model_does_not_write_json(backend: TransformersBackend) -> None:
    """The check above is meaningful: without the grammar the random model writes no JSON."""
    text, _ = await backend.chat(_request(max_tokens=40))
    with pytest.raises(ValueError):
        json.loads(text)


async def test_sampling_under_a_grammar_stays_valid(backend: TransformersBackend) -> None:
    schema = SCHEMAS[2]
    for seed in range(2):
        request = _request(schema=schema, max_tokens=200, temperature=1.5, top_k=3, seed=seed)
        text, final = await backend.chat(request)
        jsonschema.validate(json.loads(text), schema)
        assert final.finish_reason == "stop"


async def test_grammars_are_compiled_once_per_schema(backend: TransformersBackend) -> None:
    schema = {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]}
    first = backend._grammar(schema)
    assert backend._grammar(json.loads(json.dumps(schema))) is first


async def test_a_schema_xgrammar_cannot_compile_is_an_invalid_request(
    backend: TransformersBackend,
) -> None:
    schema = {
        "type": "object",
        "properties": {"x": {"type": "string", "pattern": "(?<=a)b"}},
        "required": ["x"],
    }
    with pytest.raises(InvalidRequestError, match="cannot be compiled") as caught:
        await _collect(backend, _request(schema=schema))
    assert "/project/cpp" not in str(caught.value)


# ----- streaming details -------------------------------------------------------------------


class _FakeJob:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.stop_hit = False

    def send(self, kind: str, payload: Any = None) -> None:
        self.sent.append(payload)


def _stream_ids(processor: Any, text: str, stops: tuple[str, ...] = ()) -> tuple[list[str], Any]:
    tokenizer = processor.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids.append(tokenizer.convert_tokens_to_ids("<end_of_turn>"))
    job = _FakeJob()
    streamer = tb._DeltaStreamer(
        lambda chunk: tokenizer.decode(chunk, skip_special_tokens=True),
        job,  # type: ignore[arg-type]
        stops,
    )
    streamer.put(torch.tensor([[2, 4]]))  # the prompt comes first and is skipped
    for token in ids:
        streamer.put(torch.tensor([token]))
    streamer.end()
    return job.sent, job


def test_streamed_text_keeps_reasoning_markers_and_never_splits_a_character(
    reference_model: Any,
) -> None:
    processor, _ = reference_model
    text = "<unused94>thought: 🩺 K⁺ ok<unused95>Potassium 4.1 mmol/L, naïve → fine 患者"
    deltas, _ = _stream_ids(processor, text)
    assert "".join(deltas) == text  # <end_of_turn> dropped, <unused9x> kept
    assert all("\ufffd" not in delta for delta in deltas)
    assert len(deltas) > 5


def test_stop_strings_are_never_streamed_even_across_tokens(reference_model: Any) -> None:
    processor, _ = reference_model
    deltas, job = _stream_ids(processor, "Assessment: stable. STOP HERE and more", ("STOP HERE",))
    assert "".join(deltas) == "Assessment: stable. "
    assert job.stop_hit


# ----- concurrency and cancellation ----------------------------------------------------------


async def test_concurrent_streams_each_get_their_own_text(backend: TransformersBackend) -> None:
    first = _request("First patient: fever.", max_tokens=12)
    second = _request("Second patient: rash.", images=(_image(3),), max_tokens=12)
    alone = [await backend.chat(first), await backend.chat(second)]
    together = await asyncio.gather(backend.chat(first), backend.chat(second), backend.chat(first))
    assert [t for t, _ in together] == [alone[0][0], alone[1][0], alone[0][0]]
    assert [e.prompt_tokens for _, e in together] == [
        alone[0][1].prompt_tokens,
        alone[1][1].prompt_tokens,
        alone[0][1].prompt_tokens,
    ]


async def test_closing_the_stream_early_stops_generation(
    backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = _Recorder(monkeypatch)
    stream = backend.stream(_request(max_tokens=4000))
    received = [await anext(stream) for _ in range(2)]
    assert all(not e.done for e in received)
    await stream.aclose()
    # The worker is single-threaded: this completes only once the long generation stopped.
    _, final = await _collect(backend, _request(max_tokens=3))
    assert (final.finish_reason, final.output_tokens) == ("length", 3)
    cancelled = recorder.done[0]
    assert cancelled[0] == "cancelled" and cancelled[2] < 4000


async def test_cancelled_callers_free_the_worker_running_or_queued(
    backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = _Recorder(monkeypatch)
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in backend.stream(_request(max_tokens=4000)):
            started.set()

    running = asyncio.create_task(consume())
    await started.wait()
    queued = asyncio.create_task(_collect(backend, _request(max_tokens=4000)))
    while len(backend._jobs) < 2:  # the second job waits behind the first on the worker
        await asyncio.sleep(0.01)
    queued.cancel()
    running.cancel()
    for task in (queued, running):
        with pytest.raises(asyncio.CancelledError):
            await task
    _, final = await _collect(backend, _request(max_tokens=2))
    assert final.finish_reason == "length"
    assert [d[0] for d in recorder.done] == ["cancelled", "cancelled", "length"]
    assert recorder.done[0][2] < 4000  # stopped mid-way
    assert recorder.done[1][2] == 0  # never ran


# ----- through the engine ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(backend: TransformersBackend) -> Engine:
    return Engine(backend, load_settings(max_output_tokens=16))


async def test_engine_generate_text(engine: Engine, backend: TransformersBackend) -> None:
    result = await engine.generate("Summarise the note.", system="You are careful.", max_tokens=10)
    direct, final = await backend.chat(
        ChatRequest(
            (Message("user", "You are careful.\n\nSummarise the note."),),
            GenerationOptions(max_tokens=10),
        )
    )
    assert result.backend == "transformers" and result.model == backend.model
    assert result.prompt_tokens == final.prompt_tokens and result.prompt_tokens_exact
    assert result.output_tokens == final.output_tokens == 10
    assert result.finish_reason == "length" and result.text == direct


async def test_engine_generate_with_an_image(engine: Engine) -> None:
    text_only = await engine.generate("Describe the image.", max_tokens=4)
    result = await engine.generate("Describe the image.", images=[_image(5).pixels], max_tokens=4)
    assert result.prompt_tokens == text_only.prompt_tokens + model_facts.IMAGE_PROMPT_TOKENS
    assert result.output_tokens == 4 and result.text != text_only.text


class Finding(BaseModel):
    finding: str = Field(max_length=20)
    severity: int = Field(ge=1, le=5)
    follow_up: bool


async def test_engine_extract_with_a_schema(engine: Engine) -> None:
    result = await engine.extract(
        "CT: small nodule in the right upper lobe.", schema=Finding, max_tokens=120
    )
    assert isinstance(result.value, Finding)
    assert 1 <= result.value.severity <= 5
    assert result.attempts == 1 and result.finish_reason == "stop"
    assert Finding.model_validate_json(result.text) == result.value
