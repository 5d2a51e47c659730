"""`coheara finetune` and adapters, for real on the tiny random-weight model.

Two LoRA adapters are trained here on synthetic SLM-05 cases (a few CPU steps each): one
through the Python API, one through the CLI. The checks use values that random weights
cannot fake: the training prompt equals what the backend renders for the live request,
labels mask exactly the prompt, the loss falls, each adapter's greedy output equals a
direct PEFT reference and differs from the base, the merged checkpoint's logits equal the
adapter model's, and the exports carry the right files and names.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("trl")
pytest.importorskip("xgrammar")

import typer  # noqa: E402

from cli_support import Ran  # noqa: E402
from coheara import Engine, Settings, model_facts  # noqa: E402
from coheara.adapters import (  # noqa: E402
    VISION_MARKERS,
    AdapterRecord,
    AdapterRegistry,
    LoraSettings,
    base_fingerprint,
    now,
)
from coheara.backends.base import ChatRequest, GenerationOptions, Message  # noqa: E402
from coheara.backends.ollama import OllamaBackend  # noqa: E402
from coheara.backends.openai_compat import OpenAIBackend  # noqa: E402
from coheara.backends.transformers_backend import TransformersBackend  # noqa: E402
from coheara.cli.common import report  # noqa: E402
from coheara.cli.finetune import adapters_app, finetune_command  # noqa: E402
from coheara.errors import (  # noqa: E402
    CohearaError,
    ConfigurationError,
    InvalidRequestError,
    UnsupportedCapabilityError,
)
from coheara.evaluation.gold import load as load_gold  # noqa: E402
from coheara.finetune.data import IGNORE, answer_text, build_training_set  # noqa: E402
from coheara.finetune.export import export_merged, export_vllm, vllm_problems  # noqa: E402
from coheara.finetune.train import TrainConfig, build_trainer, train, train_model  # noqa: E402
from coheara.settings import load_settings  # noqa: E402
from coheara.tasks.registry import get_task  # noqa: E402
from coheara.tasks.runner import run_task  # noqa: E402

CASES_A = [
    {
        "id": "plain-a1",
        "task": "SLM-05",
        "request": {"input": {"text": "Take metformin 500 mg twice daily with food."}},
        "expected": {
            "draft": {
                "plain_text": "Take metformin 500 mg two times a day with food.",
                "glossary": [{"term": "metformin", "meaning": "a medicine for blood sugar"}],
                "explain_in_person": [],
                "accuracy_flags": [],
            }
        },
    },
    {
        "id": "plain-a2",
        "task": "SLM-05",
        "request": {"input": {"text": "Blood pressure 150/95. Start lisinopril 10 mg daily."}},
        # Keys out of the schema's order, and the computed readability the model never writes.
        "expected": {
            "draft": {
                "accuracy_flags": [],
                "readability": None,
                "plain_text": "Your blood pressure was 150/95. Start lisinopril 10 mg each day.",
                "glossary": [],
            }
        },
    },
]
CASES_B = [
    {
        "id": "plain-b1",
        "task": "SLM-05",
        "request": {"input": {"text": "Stop warfarin for 5 days before surgery."}},
        "expected": {"draft": {"plain_text": "Do not take warfarin for 5 days before surgery."}},
    },
    {
        "id": "plain-b2",
        "task": "SLM-05",
        "request": {"input": {"text": "Creatinine 1.4 mg/dL, repeat in 2 weeks."}},
        "expected": {
            "draft": {"plain_text": "Your kidney test was 1.4. Check it again in 2 weeks."}
        },
    },
    {"id": "lab-1", "task": "EXT-LAB", "request": {"input": {"report": "Sodium 140 mmol/L"}}},
]
PROMPT = "Take metformin 500 mg"
pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"  # PEFT on transformers 5
)


def _record(name: str, path: Path | str, **changes: Any) -> AdapterRecord:
    """A synthetic registry record (no files behind it)."""
    values: dict[str, Any] = {
        "name": name,
        "task": "SLM-05",
        "base_model": "/models/base",
        "base_fingerprint": "0" * 64,
        "data_file": "/data/plain.jsonl",
        "data_sha256": "1" * 64,
        "cases": 2,
        "lora": LoraSettings(target_modules=r".*\.language_model\..*\.(q_proj)"),
        "qlora": False,
        "steps": 3,
        "epochs": 1.5,
        "learning_rate": 2e-4,
        "first_loss": 2.0,
        "final_loss": 1.0,
        "created": "2025-01-01T00:00:00Z",
        "path": str(path),
    }
    return AdapterRecord(**{**values, **changes})


def _modes(folder: Path) -> dict[str, int]:
    """Permission bits of `folder` (".") and of everything in it."""
    return {
        str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]
    }


def _assert_private(folder: Path) -> None:
    modes = _modes(folder)
    assert {m for n, m in modes.items() if (folder / n).is_dir()} == {0o700}, modes
    assert {m for n, m in modes.items() if not (folder / n).is_dir()} == {0o600}, modes


def _jsonl(path: Path, cases: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(c) + "\n" for c in cases), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A user data directory of this module's own: the registry lives under it."""
    root = tmp_path_factory.mktemp("finetune-home")
    umask = os.umask(0o022)  # the usual one: files 0644 unless the code says otherwise
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("XDG_DATA_HOME", str(root))
            yield root
    finally:
        os.umask(umask)


@pytest.fixture(scope="module")
def registry(home: Path) -> AdapterRegistry:
    folder = load_settings().adapters_dir
    assert folder == home / "coheara" / "adapters"
    return AdapterRegistry(folder)


@pytest.fixture(scope="module")
def gold_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _jsonl(tmp_path_factory.mktemp("gold") / "plain-a.jsonl", CASES_A)


@pytest.fixture(scope="module")
def examples_a(tiny_model_dir: Path, gold_a: Path) -> Any:
    backend = TransformersBackend(str(tiny_model_dir), device="cpu")
    return build_training_set(load_gold(gold_a).cases, "SLM-05", backend, Settings())


@pytest.fixture(scope="module")
def adapter_a(
    tiny_model_dir: Path, examples_a: Any, registry: AdapterRegistry, gold_a: Path
) -> tuple[Any, AdapterRecord]:
    """Trained through the Python API and registered as `coheara finetune` would."""
    out = registry.default_folder("plain-a")
    config = TrainConfig(
        steps=6, learning_rate=1e-2, batch_size=1, accumulation=1, device="cpu", seed=0
    )
    result = train(tiny_model_dir, examples_a.examples, out, config)
    record = AdapterRecord(
        name="plain-a",
        task="SLM-05",
        base_model=str(tiny_model_dir),
        base_fingerprint=base_fingerprint(tiny_model_dir),
        data_file=str(gold_a),
        data_sha256=load_gold(gold_a).sha256,
        cases=len(examples_a.examples),
        lora=LoraSettings(target_modules=result.target_modules),
        qlora=False,
        steps=result.steps,
        epochs=result.epochs,
        learning_rate=1e-2,
        first_loss=result.first_loss,
        final_loss=result.final_loss,
        created=now(),
        path=str(out),
    )
    registry.add(record)
    return result, record


def _cli() -> Callable[..., Ran]:
    """The commands as `coheara.cli.main.main` runs them: errors one line, with exit codes."""
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    app.command("finetune")(finetune_command)
    app.add_typer(adapters_app, name="adapters")

    def run(*args: str) -> Ran:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                app(args=list(args), prog_name="coheara")
                code = 0
            except SystemExit as exit_:
                code = int(exit_.code or 0)
            except CohearaError as error:
                report(error)
                code = error.exit_code
        return Ran(code, out.getvalue(), err.getvalue())

    return run


@pytest.fixture(scope="module")
def gold_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _jsonl(tmp_path_factory.mktemp("gold-b") / "plain-b.jsonl", CASES_B)


@pytest.fixture(scope="module")
def adapter_b_run(tiny_model_dir: Path, registry: AdapterRegistry, gold_b: Path) -> Ran:
    """`coheara finetune` training plain-b: what it printed."""
    ran = _cli()(
        "finetune", "SLM-05", "--data", str(gold_b), "--base", str(tiny_model_dir),
        "--name", "plain-b", "--steps", "3", "--lr", "2e-2", "--batch-size", "1",
        "--accumulate", "1", "--device", "cpu", "--seed", "1",
    )  # fmt: skip
    assert ran.returncode == 0, ran
    return ran


@pytest.fixture(scope="module")
def adapter_b(adapter_b_run: Ran, registry: AdapterRegistry) -> AdapterRecord:
    """Trained through `coheara finetune` (its output is checked in a test below)."""
    ran = adapter_b_run
    record = registry.get("plain-b")
    assert ran.stdout.startswith("adapter plain-b for SLM-05: 3 steps, loss ")
    assert f"saved in {record.path}" in ran.stdout
    return record


@pytest.fixture(scope="module")
async def served(
    tiny_model_dir: Path, registry: AdapterRegistry, adapter_a: Any, adapter_b: AdapterRecord
) -> Any:
    backend = TransformersBackend(str(tiny_model_dir), device="cpu", adapters_dir=registry.folder)
    yield backend
    await backend.aclose()


def _request(adapter: str | None, max_tokens: int = 10) -> ChatRequest:
    return ChatRequest(
        (Message("user", PROMPT),), GenerationOptions(max_tokens=max_tokens, adapter=adapter)
    )


def _reference(model_dir: Path, adapter: Path | None, max_tokens: int = 10) -> str:
    """Greedy text from the checkpoint loaded directly, with the adapter through PEFT."""
    processor = transformers.AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        model_dir, local_files_only=True, dtype=torch.float32
    ).eval()
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter)).eval()
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = processor.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(input_ids=ids, max_new_tokens=max_tokens, do_sample=False)
    return str(processor.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


# ----- data: the prompt as inference writes it, the loss on the answer only ---------------


def test_answer_is_the_draft_as_compact_json_in_schema_order() -> None:
    spec = get_task("SLM-05")
    draft = CASES_A[1]["expected"]["draft"]
    assert answer_text(spec, draft, Settings()) == (
        '{"plain_text":"Your blood pressure was 150/95. Start lisinopril 10 mg each day.",'
        '"glossary":[],"accuracy_flags":[]}'
    )
    with pytest.raises(InvalidRequestError, match=r"plain_text: type") as caught:
        answer_text(spec, {"plain_text": 12}, Settings())
    assert "12" not in str(caught.value)  # paths and rules, never values


def test_training_set_keeps_the_task_cases_with_a_draft(
    examples_a: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    assert [e.case_id for e in examples_a.examples] == ["plain-a1", "plain-a2"]
    mixed = load_gold(_jsonl(tmp_path / "mixed.jsonl", CASES_B))
    backend = TransformersBackend(str(tiny_model_dir), device="cpu")
    with pytest.raises(InvalidRequestError, match=r"no case of EXT-LAB with an expected\.draft"):
        build_training_set(mixed.cases, "EXT-LAB", backend, Settings())
    with pytest.raises(InvalidRequestError, match="reads images"):
        build_training_set(mixed.cases, "IMG-CXR", backend, Settings())


def test_labels_are_masked_on_the_prompt_and_equal_the_answer(
    examples_a: Any, tiny_model_dir: Path
) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    end = tokenizer.convert_tokens_to_ids(model_facts.END_OF_TURN)
    for example in examples_a.examples:
        prompt_ids = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
        n = len(prompt_ids)
        assert example.input_ids == [*prompt_ids, *answer_ids, end]
        assert example.labels[:n] == [IGNORE] * n
        assert example.labels[n:] == [*answer_ids, end]
        assert example.prompt.endswith("<start_of_turn>model\n")
        assert example.prompt.startswith("<bos><start_of_turn>user\n")
    assert examples_a.examples[0].answer.startswith('{"plain_text":"Take metformin 500 mg two')


def test_the_batch_the_trainer_builds_masks_the_prompt_and_the_padding(
    tiny_model_dir: Path, examples_a: Any, tmp_path: Path
) -> None:
    """Finding 8: TRL's collator keeps our labels (-100 on the prompt) and pads with -100;
    checked on the batch its own dataloader yields, two examples of unequal length."""
    from coheara.finetune.train import load_base

    examples = examples_a.examples
    lengths = [len(e.input_ids) for e in examples]
    assert len(examples) == 2 and lengths[0] != lengths[1]
    model = load_base(tiny_model_dir, "cpu", qlora=False)
    tokenizer = TransformersBackend(str(tiny_model_dir), device="cpu").tokenizer
    config = TrainConfig(steps=1, batch_size=2, accumulation=1, device="cpu")
    trainer = build_trainer(model, tokenizer, examples, config, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    width = max(lengths)
    assert tuple(batch["input_ids"].shape) == tuple(batch["labels"].shape) == (2, width)
    seen = []
    for row in range(2):
        ids = batch["input_ids"][row].tolist()
        labels = batch["labels"][row].tolist()
        example = next(e for e in examples if ids[: len(e.input_ids)] == e.input_ids)
        seen.append(example.case_id)
        n, prompt = len(example.input_ids), example.prompt_tokens
        assert 0 < prompt < n
        assert labels[:prompt] == [IGNORE] * prompt  # the prompt: no loss
        assert labels[prompt:n] == example.input_ids[prompt:]  # the answer and <end_of_turn>
        assert labels[n:] == [IGNORE] * (width - n)  # the padding: no loss
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
    assert sorted(seen) == ["plain-a1", "plain-a2"]


async def test_training_prompt_equals_what_the_backend_renders_for_the_live_request(
    tiny_model_dir: Path, examples_a: Any
) -> None:
    backend = TransformersBackend(str(tiny_model_dir), device="cpu")
    rendered: list[str] = []
    fed: list[list[int]] = []
    render, inputs = backend._render, backend._inputs

    def spy_render(request: ChatRequest) -> str:
        rendered.append(render(request))
        return rendered[-1]

    def spy_inputs(request: ChatRequest) -> Any:
        result = inputs(request)
        fed.append(result["input_ids"][0].tolist())
        return result

    backend._render = spy_render  # type: ignore[method-assign]
    backend._inputs = spy_inputs  # type: ignore[method-assign]
    engine = Engine(backend, Settings(extract_retries=0, extract_field_fallback=False))
    request = {**CASES_A[0]["request"], "max_tokens": 4}
    try:
        with pytest.raises(CohearaError):  # 4 tokens cannot close the JSON: one attempt only
            await run_task(engine, request, task="SLM-05")
    finally:
        await engine.aclose()
    example = examples_a.examples[0]
    assert rendered[0] == example.prompt
    n = sum(1 for label in example.labels if label == IGNORE)
    assert fed[0] == example.input_ids[:n]


# ----- training ----------------------------------------------------------------------------


def test_a_few_steps_lower_the_loss_and_only_the_language_model_is_adapted(
    adapter_a: Any,
) -> None:
    result, record = adapter_a
    assert result.steps == 6 and len(result.losses) == 6
    assert result.losses[-1] < result.losses[0] - 0.15, result.losses
    assert record.final_loss == result.losses[-1]
    assert "language_model" in result.target_modules
    assert "vision" not in result.target_modules
    # rank 16 on q, k, v, o, gate, up, down of the tiny model's 2 layers (hidden 64,
    # q 2x32, kv 1x32, mlp 128): r * (in + out) summed
    per_layer = 16 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64))
    assert result.trainable_parameters == 2 * per_layer
    saved = Path(record.path)
    assert (saved / "adapter_config.json").is_file()
    assert (saved / "adapter_model.safetensors").is_file()


def test_qlora_without_cuda_is_one_configuration_line(
    tiny_model_dir: Path, gold_a: Path, home: Path
) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine can run QLoRA")
    ran = _cli()(
        "finetune", "SLM-05", "--data", str(gold_a), "--base", str(tiny_model_dir),
        "--name", "q", "--qlora", "--steps", "1",
    )  # fmt: skip
    assert ran.returncode == 3
    assert ran.stderr.count("\n") == 1 and "QLoRA needs a CUDA GPU" in ran.stderr


def test_one_list_of_vision_markers_refused_by_training_and_by_the_vllm_export(
    tmp_path: Path,
) -> None:
    """Finding 6: training and export refuse the same markers (train.py lacked `visual.`)."""
    import coheara.finetune.export as export_module
    import coheara.finetune.train as train_module
    from coheara.finetune.data import Example

    for module in (train_module, export_module):
        assert getattr(module, "VISION_MARKERS", VISION_MARKERS) is VISION_MARKERS
    example = Example("c1", "p", "a", [2, 5, 6], [IGNORE, 5, 6])
    stub = type("Stub", (), {"device": "cpu"})()  # refused before any model is touched
    for marker in VISION_MARKERS:
        targets = f".*{marker}.*q_proj"
        config = TrainConfig(lora=LoraSettings(target_modules=targets), device="cpu")
        with pytest.raises(InvalidRequestError, match="LoRA on the vision tower"):
            train_model(stub, None, [example], tmp_path / "never", config)
        problems = vllm_problems({"peft_type": "LORA", "target_modules": targets}, [])
        assert len(problems) == 1 and marker.rstrip(".") in problems[0]
    assert not (tmp_path / "never").exists()


# ----- serving: several adapters on one base, chosen per request ---------------------------


async def test_adapters_and_base_are_chosen_per_request(
    served: TransformersBackend,
    tiny_model_dir: Path,
    adapter_a: Any,
    adapter_b: AdapterRecord,
) -> None:
    plain = TransformersBackend(str(tiny_model_dir), device="cpu")
    try:
        base_alone, _ = await plain.chat(_request(None))
    finally:
        await plain.aclose()
    got = {}
    for name in ("plain-a", None, "plain-b", "plain-a", None):
        text, done = await served.chat(_request(name))
        assert got.setdefault(name, text) == text  # switching back gives the same text
        assert done.finish_reason in ("stop", "length")
    assert got[None] == base_alone
    assert got["plain-a"] == _reference(tiny_model_dir, Path(adapter_a[1].path))
    assert got["plain-b"] == _reference(tiny_model_dir, Path(adapter_b.path))
    assert len({got[None], got["plain-a"], got["plain-b"]}) == 3


async def test_unknown_or_foreign_adapter_is_refused(
    served: TransformersBackend, registry: AdapterRegistry, adapter_a: Any
) -> None:
    with pytest.raises(InvalidRequestError, match="unknown adapter 'nope'") as caught:
        await served.chat(_request("nope"))
    assert "registered: plain-a, plain-b" in str(caught.value)
    registry.add(replace(adapter_a[1], name="foreign", base_fingerprint="0" * 64))
    try:
        with pytest.raises(ConfigurationError, match="trained on another base model"):
            await served.chat(_request("foreign"))
    finally:
        registry.remove("foreign")


async def test_task_request_with_adapter_goes_through_run_task(
    served: TransformersBackend, adapter_a: Any
) -> None:
    seen: list[str | None] = []
    scope = served._adapter_scope

    def spy(model: Any, name: str | None) -> Any:
        seen.append(name)
        return scope(model, name)

    served._adapter_scope = spy  # type: ignore[method-assign]
    engine = Engine(served, Settings(extract_retries=0, extract_field_fallback=False))
    try:
        with pytest.raises(InvalidRequestError, match="trained for SLM-05, not EXT-LAB"):
            await run_task(
                engine, {"input": {"report": "Na 140"}, "adapter": "plain-a"}, task="EXT-LAB"
            )
        assert seen == []  # refused before any generation
        request = {**CASES_A[0]["request"], "adapter": "plain-a", "max_tokens": 4}
        with pytest.raises(CohearaError):  # 4 tokens cannot close the JSON
            await run_task(engine, request, task="SLM-05")
    finally:
        del served._adapter_scope
    assert seen == ["plain-a"]


async def test_every_call_of_a_task_carries_the_adapter_and_the_response_names_it() -> None:
    from coheara.finetune.data import RecordingBackend

    draft = {"plain_text": "Take metformin 500 mg, twice daily with food. It is long enough."}
    answer = answer_text(get_task("SLM-05"), draft, Settings())
    recorder = RecordingBackend(answer, 8192)
    request = {**CASES_A[0]["request"], "adapter": "not-registered"}
    response = await run_task(Engine(recorder, Settings()), request, task="SLM-05")
    assert len(recorder.requests) >= 1
    assert {r.options.adapter for r in recorder.requests} == {"not-registered"}
    assert response.metadata.adapter == "not-registered"
    plain = await run_task(Engine(recorder, Settings()), CASES_A[0]["request"], task="SLM-05")
    assert plain.metadata.adapter is None and recorder.requests[-1].options.adapter is None


async def test_remote_backends_refuse_an_adapter_with_the_vllm_hint() -> None:
    ollama = OllamaBackend(
        url="http://127.0.0.1:9", model="m", num_ctx=8192, timeout_s=5,
        connect_timeout_s=1, keep_alive=None,
    )  # fmt: skip
    openai = OpenAIBackend(
        base_url="http://127.0.0.1:9/v1", model="m", api_key="x", context_length=8192,
        timeout_s=5, connect_timeout_s=1,
    )  # fmt: skip
    for backend in (ollama, openai):
        with pytest.raises(UnsupportedCapabilityError, match="cannot apply adapter") as caught:
            await backend.chat(_request("plain-a"))
        assert "--format vllm" in str(caught.value)
        await backend.aclose()


async def test_a_backend_given_no_adapters_folder_has_no_adapters(
    tiny_model_dir: Path, registry: AdapterRegistry, adapter_a: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 1: the backend never reads the settings; the folder is handed to it."""
    from coheara.backends.selection import create_backend

    monkeypatch.setenv("COHEARA_ADAPTERS_DIR", str(registry.folder))  # plain-a is there
    backend = TransformersBackend(str(tiny_model_dir), device="cpu")
    try:
        with pytest.raises(InvalidRequestError, match="no adapters configured") as caught:
            await backend.chat(_request("plain-a"))
    finally:
        await backend.aclose()
    assert "\n" not in str(caught.value)
    settings = Settings(
        backend="transformers",
        transformers_model=str(tiny_model_dir),
        transformers_device="cpu",
        adapters_dir=registry.folder,
    )
    made = create_backend(settings)
    assert isinstance(made, TransformersBackend) and made._adapters_dir == registry.folder


def test_layers_below_fine_tuning_never_import_it() -> None:
    """Finding 1: the backend, engine, task and audit layers read the registry from
    `coheara.adapters`, which imports nothing of Coheara but errors and private files."""
    import ast

    import coheara

    root = Path(coheara.__file__).parent

    def imported(file: Path) -> set[str]:
        names: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        return names

    lower = [root / "adapters.py"]
    for package in ("backends", "engine", "tasks", "audit", "imaging"):
        lower.extend(sorted((root / package).rglob("*.py")))
    offenders = [
        f"{file.relative_to(root)}: {name}"
        for file in lower
        for name in imported(file)
        if name.startswith("coheara.finetune") or name.startswith("coheara.evaluation")
    ]
    assert offenders == []
    assert {n for n in imported(root / "adapters.py") if n.startswith("coheara")} == {
        "coheara.errors",
        "coheara.private_files",
    }
    assert "load_settings" not in (root / "backends" / "transformers_backend.py").read_text()


async def test_a_call_with_an_adapter_is_audited_with_its_name(
    served: TransformersBackend, adapter_a: Any, tmp_path: Path
) -> None:
    """Finding 7: the trail names the adapter that made a draft, hashed into the chain and
    in the FHIR AuditEvent; a call on the base names none."""
    from coheara.audit import AuditLog, AuditStore, verify
    from coheara.audit.export import audit_event

    engine = Engine(served, Settings())  # not closed: `served` belongs to the module
    path = tmp_path / "audit.sqlite3"
    with AuditLog.open(path) as log:
        log.attach(engine)
        adapted = await engine.generate(
            PROMPT, options=GenerationOptions(max_tokens=3, adapter="plain-a")
        )
        await engine.generate(PROMPT, options=GenerationOptions(max_tokens=3))
        assert log.flush()
        key = log.key
    store = AuditStore(path, readonly=True)
    try:
        with store.snapshot() as (records, head):
            assert verify(records, head, key).intact
        first, second = store.iter_records()
    finally:
        store.close()
    assert (first.adapter, second.adapter) == ("plain-a", None)
    assert first.outcome == second.outcome == "ok"
    assert first.output_tokens == adapted.output_tokens and first.model == str(served.model)
    details = {d["type"]["coding"][0]["code"]: d for d in audit_event(first)["entity"][0]["detail"]}
    assert details["adapter"]["valueString"] == "plain-a"
    base_details = audit_event(second)["entity"][0]["detail"]
    assert "adapter" not in {d["type"]["coding"][0]["code"] for d in base_details}


# ----- export --------------------------------------------------------------------------


def test_vllm_export_has_the_adapter_files_base_and_targets(
    adapter_a: Any, tmp_path: Path, registry: AdapterRegistry
) -> None:
    from safetensors.torch import load_file

    record = adapter_a[1]
    done = export_vllm(record, tmp_path / "vllm")
    config = json.loads((done.folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == record.base_model
    assert config["target_modules"] == record.lora.target_modules
    assert config["r"] == 16 and config["lora_alpha"] == 16 and not config["modules_to_save"]
    exported = load_file(done.folder / "adapter_model.safetensors")
    original = load_file(Path(record.path) / "adapter_model.safetensors")
    assert exported.keys() == original.keys() and len(exported) == 2 * 2 * 7
    assert all(".language_model." in key and ".lora_" in key for key in exported)
    assert all(torch.equal(exported[k], original[k]) for k in exported)
    assert f"--lora-modules plain-a={done.folder}" in done.next_step
    assert "--max-lora-rank 16" in done.next_step
    _assert_private(done.folder)  # finding 4
    assert set(_modes(done.folder)) == {".", *done.files}
    # An adapter with LoRA on the vision tower would be served without it by vLLM: refused.
    vision = tmp_path / "vision-adapter"
    shutil.copytree(record.path, vision)
    bad = dict(config, target_modules=["q_proj", "vision_tower.encoder.layers.0.self_attn.q_proj"])
    (vision / "adapter_config.json").write_text(json.dumps(bad))
    with pytest.raises(InvalidRequestError, match="vision tower"):
        export_vllm(replace(record, path=str(vision)), tmp_path / "v2")


def test_merged_export_loads_and_matches_the_adapter_model(
    adapter_a: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    record = adapter_a[1]
    done = export_merged(record, tmp_path / "merged", dtype="float32")
    assert {"config.json", "model.safetensors", "tokenizer.json", "coheara_tiny.json"} <= set(
        done.files
    )
    merged = transformers.AutoModelForImageTextToText.from_pretrained(
        done.folder, local_files_only=True, dtype=torch.float32
    ).eval()
    base = transformers.AutoModelForImageTextToText.from_pretrained(
        tiny_model_dir, local_files_only=True, dtype=torch.float32
    ).eval()
    with torch.inference_mode():
        ids = torch.tensor([[2, 4, 300, 301, 302, 5, 4, 310]])
        plain = base(input_ids=ids).logits
        adapted = peft.PeftModel.from_pretrained(base, record.path).eval()(input_ids=ids).logits
        folded = merged(input_ids=ids).logits
    assert torch.allclose(folded, adapted, atol=1e-4)
    assert (folded - plain).abs().max() > 1e-2  # the adapter is in the weights
    assert "coheara model setup --from" in done.next_step
    _assert_private(done.folder)  # finding 4


# ----- the registry through the CLI -----------------------------------------------------


def test_cli_list_show_attach_metrics_remove(
    registry: AdapterRegistry,
    adapter_a: Any,
    adapter_b: AdapterRecord,
    tmp_path: Path,
) -> None:
    run = _cli()
    assert (registry.path.stat().st_mode & 0o777) == 0o600
    listed = run("adapters", "list", "--json")
    assert listed.returncode == 0
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert set(rows) == {"plain-a", "plain-b"}
    b = rows["plain-b"]
    assert (b["task"], b["cases"], b["steps"], b["qlora"]) == ("SLM-05", 2, 3, False)
    gold_b = Path(b["data_file"])
    assert b["data_sha256"] == load_gold(gold_b).sha256
    assert b["base_fingerprint"] == base_fingerprint(Path(b["base_model"]))
    assert b["lora"]["rank"] == 16 and b["lora"]["alpha"] == 16 and b["lora"]["dropout"] == 0.05
    assert b["final_loss"] is not None and b["metrics"] is None
    assert Path(b["path"]) == registry.folder / "plain-b"

    shown = run("adapters", "show", "plain-b")
    assert json.loads(shown.stdout) == b
    table = run("adapters", "list")
    assert "plain-a" in table.stdout and "plain-b" in table.stdout

    report = tmp_path / "report.json"
    metrics = {"schema_valid": 1.0, "reading_grade_met": 0.5}
    report.write_text(
        json.dumps(
            {
                "run": "run-1",
                "generated": "2025-01-01T00:00:00Z",
                "summary": {
                    "base": {"SLM-05": {"schema_valid": 1.0, "reading_grade_met": 0.0}},
                    "adapter:plain-b": {"SLM-05": metrics},
                },
            }
        )
    )
    attached = run("adapters", "attach-metrics", "plain-b", str(report))
    assert attached.returncode == 0, attached
    stored = registry.get("plain-b").metrics
    assert stored is not None
    assert stored["adapter"] == metrics and stored["base"]["reading_grade_met"] == 0.0
    assert stored["run"] == "run-1" and stored["task"] == "SLM-05"
    missing = run("adapters", "attach-metrics", "plain-a", str(report))
    assert missing.returncode == 4 and "no run of adapter 'plain-a'" in missing.stderr

    unknown = run("adapters", "show", "nope")
    assert unknown.returncode == 4
    assert unknown.stderr.count("\n") == 1 and "registered: plain-a, plain-b" in unknown.stderr


def test_finetune_suggests_an_eval_command_that_parses(
    adapter_b_run: Ran, tiny_model_dir: Path
) -> None:
    """Finding 2: the gold set is `coheara eval`'s argument, not a --gold option."""
    import shlex

    from coheara.cli.eval import eval_command

    lines = [line for line in adapter_b_run.stderr.splitlines() if line.startswith("next: ")]
    assert lines == [
        f"next: coheara eval GOLD.jsonl --task SLM-05 --backend transformers --model "
        f"{tiny_model_dir} --adapter plain-b, then coheara adapters attach-metrics plain-b "
        "RUN/report.json"
    ]
    suggested = lines[0].removeprefix("next: coheara eval ").split(", then ")[0]
    app = typer.Typer(add_completion=False)
    app.command()(eval_command)
    parsed = typer.main.get_command(app).make_context("eval", shlex.split(suggested)).params
    assert [str(p) for p in parsed["gold"]] == ["GOLD.jsonl"]
    assert parsed["task"] == ["SLM-05"] and parsed["adapter"] == ["plain-b"]
    assert (parsed["backend"], parsed["model"]) == ("transformers", str(tiny_model_dir))


def test_adapters_are_this_users_only(
    registry: AdapterRegistry, adapter_a: Any, adapter_b: AdapterRecord
) -> None:
    """Finding 4: the adapters folder and each adapter's folder 0700, their files 0600
    (the umask is 022 here), through the Python API and the CLI; no training leftovers."""
    assert registry.folder.stat().st_mode & 0o777 == 0o700
    assert registry.folder.parent.stat().st_mode & 0o777 == 0o700  # coheara/, made here
    for folder in (Path(adapter_a[1].path), Path(adapter_b.path)):
        _assert_private(folder)
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(_modes(folder))
    assert not [p.name for p in registry.folder.iterdir() if p.name.endswith(".partial")]


def test_replace_never_deletes_another_adapters_files(
    registry: AdapterRegistry,
    adapter_a: Any,
    adapter_b: AdapterRecord,
    tiny_model_dir: Path,
    gold_a: Path,
) -> None:
    """Finding 3: `--replace --out` another adapter's folder is refused before training,
    for a registered name and a new one alike; nothing is deleted."""
    run = _cli()
    folder = Path(adapter_a[1].path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for name in ("plain-b", "plain-new"):
        ran = run(
            "finetune", "SLM-05", "--data", str(gold_a), "--base", str(tiny_model_dir),
            "--name", name, "--replace", "--out", str(folder), "--steps", "1", "--device", "cpu",
        )  # fmt: skip
        assert ran.returncode == 4, ran
        assert ran.stderr.count("\n") == 1
        assert f"--replace will not delete {folder}: it holds adapter 'plain-a'" in ran.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert registry.find("plain-new") is None
    kept = registry.get("plain-b")
    assert (kept.created, kept.path, kept.steps) == (adapter_b.created, adapter_b.path, 3)


def test_replace_target_rules(tmp_path: Path) -> None:
    """Finding 3, each rule: this name's registered folder or default folder only, and
    never one holding (or inside) another adapter's files."""
    from coheara.cli.finetune import _check_target

    registry = AdapterRegistry(tmp_path / "adapters")
    registry.add(_record("mine", registry.folder / "kept-elsewhere"))
    registry.add(_record("other", registry.folder / "other"))
    registry.add(_record("nested", registry.folder / "fresh" / "nested"))
    for name in ("mine", "kept-elsewhere", "other", "stray", "fresh/nested", "empty"):
        (registry.folder / name).mkdir(parents=True, exist_ok=True)
        if name != "empty":
            (registry.folder / name / "adapter_config.json").write_text("{}")
    mine = registry.get("mine")

    def check(name: str, folder: str, replace: bool = True) -> None:
        target = (registry.folder / folder).resolve()
        _check_target(registry, name, registry.find(name), target, replace)

    check("mine", "mine")  # its default folder
    check("mine", "kept-elsewhere")  # the folder registered for it
    check("stray", "stray")  # a new name's default folder
    check("mine", "empty", replace=False)  # an empty folder needs no --replace
    check("mine", "absent", replace=False)
    refusals = {
        ("mine", "other"): "it holds adapter 'other'",
        ("mine", "stray"): "it is not 'mine''s folder",
        ("fresh", "fresh"): "it holds adapter 'nested'",  # its default folder, someone inside
        ("other", "fresh/nested"): "it holds adapter 'nested'",
        ("mine", "."): "it holds the adapter registry",  # the adapters folder itself
        ("mine", ".."): "it holds the adapter registry",
    }
    for (name, folder), why in refusals.items():
        with pytest.raises(InvalidRequestError, match="--replace will not delete") as caught:
            check(name, folder)
        assert why in caught.value.message
    with pytest.raises(InvalidRequestError, match="exists and is not empty"):
        check("mine", "mine", replace=False)
    assert registry.get("mine") == mine


VALID_ROW = _record("plain-a", "/adapters/plain-a").to_dict()


def _deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"m": value}
    return value


def _document(*rows: Any, **top: Any) -> bytes:
    return json.dumps({"format": 1, "adapters": list(rows), **top}).encode("utf-8")


HOSTILE: dict[str, tuple[bytes, str]] = {
    "name-a-number": (_document({**VALID_ROW, "name": 5}), "adapters[0]: name is not a string"),
    "row-not-an-object": (
        _document(VALID_ROW, ["plain-b"]),
        "adapters[1]: the record is not an object",
    ),
    "deep-nesting": (
        b'{"format": 1, "adapters": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "it nests too deeply",
    ),
    "invalid-utf8": (b'{"format": 1, "adapters": [{"name": "plain-\xff"}]}', "it is not UTF-8"),
    "lora-rank-a-string": (
        _document({**VALID_ROW, "lora": {**VALID_ROW["lora"], "rank": "16"}}),
        "adapters[0]: lora.rank is not an integer",
    ),
    "lora-dropout-a-boolean": (
        _document({**VALID_ROW, "lora": {**VALID_ROW["lora"], "dropout": True}}),
        "adapters[0]: lora.dropout is not a number",
    ),
    "lora-a-list": (
        _document({**VALID_ROW, "lora": [16, 16]}),
        "adapters[0]: lora is not an object",
    ),
    "lora-unknown-field": (
        _document({**VALID_ROW, "lora": {"rank": 16, "use_dora": True}}),
        "adapters[0]: unknown field 'lora.use_dora'",
    ),
    "qlora-a-string": (
        _document({**VALID_ROW, "qlora": "no"}),
        "adapters[0]: qlora is not a boolean",
    ),
    "loss-infinite": (
        _document({**VALID_ROW, "final_loss": float("inf")}),
        "adapters[0]: final_loss is not a finite number",
    ),
    "path-missing": (
        _document({k: v for k, v in VALID_ROW.items() if k != "path"}),
        "adapters[0]: path is missing",
    ),
    "name-a-path": (
        _document({**VALID_ROW, "name": "../../etc"}),
        "adapters[0]: name is not a valid adapter name",
    ),
    "metrics-nested-deep": (
        _document({**VALID_ROW, "metrics": _deep(40)}),
        "adapters[0]: metrics nests deeper than 32 levels",
    ),
    "adapters-not-a-list": (_document(adapters={}), "it has no list of adapters"),
    "another-format": (_document(VALID_ROW, format=2), "its format is not 1"),
    "not-json": (b'{"adapters": [', "it is not JSON (line 1)"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_damaged_registry_is_one_configuration_line(case: str, tmp_path: Path) -> None:
    """Finding 5: what is wrong and where, naming the file; never a value, a traceback."""
    content, why = HOSTILE[case]
    registry = AdapterRegistry(tmp_path)
    registry.path.write_bytes(content)
    with pytest.raises(ConfigurationError) as caught:
        registry.find("plain-a")
    error = caught.value
    assert error.message == f"the adapter registry {registry.path} is not valid: {why}"
    assert "\n" not in str(error) and "restore it" in str(error)


def test_a_valid_record_reads_back_equal(tmp_path: Path) -> None:
    metrics = {"adapter": {"schema_valid": 1.0, "strata": {"tag": {"n": 2}}}, "run": "r1"}
    record = _record("plain-a", tmp_path / "plain-a", metrics=metrics, extra={"seed": 0})
    registry = AdapterRegistry(tmp_path)
    registry.add(record)
    assert registry.records() == [record]
    assert AdapterRecord.from_dict(record.to_dict()) == record
    with pytest.raises(ConfigurationError, match=r"^invalid adapter record: name is not a string$"):
        AdapterRecord.from_dict({**record.to_dict(), "name": 5})


@pytest.mark.parametrize("case", ["name-a-number", "deep-nesting", "lora-rank-a-string"])
async def test_a_damaged_registry_through_the_cli_a_task_and_the_backend(
    case: str, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 5: the same one line where a registry is read: `coheara adapters`,
    `coheara finetune`, a task request naming an adapter, the backend."""
    from coheara.finetune.data import RecordingBackend

    content, why = HOSTILE[case]
    folder = tmp_path / "adapters"
    folder.mkdir()
    (folder / "registry.json").write_bytes(content)
    expected = f"the adapter registry {folder / 'registry.json'} is not valid: {why}"
    monkeypatch.setenv("COHEARA_ADAPTERS_DIR", str(folder))
    run = _cli()
    finetune = ("finetune", "SLM-05", "--data", "x.jsonl", "--base", "m", "--name", "plain-a")
    for args in (("adapters", "list"), ("adapters", "show", "plain-a"), finetune):
        ran = run(*args)
        assert ran.returncode == 3, (args, ran)
        assert ran.stderr.count("\n") == 1 and ran.stderr.startswith(f"error: {expected} (")

    recorder = RecordingBackend("{}", 8192)
    request = {**CASES_A[0]["request"], "adapter": "plain-a"}
    with pytest.raises(ConfigurationError) as caught:
        await run_task(Engine(recorder, Settings(adapters_dir=folder)), request, task="SLM-05")
    assert caught.value.message == expected and recorder.requests == []

    backend = TransformersBackend(str(tiny_model_dir), device="cpu", adapters_dir=folder)
    try:
        with pytest.raises(ConfigurationError) as caught:
            await backend.chat(_request("plain-a"))
    finally:
        await backend.aclose()
    assert caught.value.message == expected


def test_cli_finetune_output_and_remove(
    registry: AdapterRegistry, adapter_b: AdapterRecord,
    tiny_model_dir: Path, gold_a: Path,
) -> None:  # fmt: skip
    run = _cli()
    taken = run(
        "finetune", "SLM-05", "--data", str(gold_a), "--base", str(tiny_model_dir),
        "--name", "plain-b", "--steps", "1",
    )  # fmt: skip
    assert taken.returncode == 4 and "registered already" in taken.stderr
    folder = Path(adapter_b.path)
    copy = registry.folder.parent / "plain-b-copy"
    shutil.copytree(folder, copy)
    removed = run("adapters", "remove", "plain-b")
    assert removed.returncode == 0
    assert registry.find("plain-b") is None and not folder.exists()
    # An adapter kept outside the adapters folder is unregistered, its files kept.
    registry.add(replace(adapter_b, path=str(copy)))
    run("adapters", "remove", "plain-b")
    assert registry.find("plain-b") is None and copy.is_dir()


def test_bench_script_imports_and_helps() -> None:
    import subprocess

    script = Path(__file__).parent.parent / "bench" / "finetune_gpu.py"
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "--steps" in done.stdout


def test_eval_compares_base_and_adapter_in_one_run(
    tiny_model_dir: Path, home: Path, gold_a: Path, adapter_a: Any, tmp_path: Path
) -> None:
    """`coheara eval --adapter`: every case under the base and under the adapter, in one
    run folder and one report, the adapter's drafts named as its own."""
    from cli_support import run_coheara

    env = {
        **os.environ,
        "XDG_DATA_HOME": str(home),
        "COHEARA_MAX_OUTPUT_TOKENS": "24",
        "COLUMNS": "200",
    }
    out = tmp_path / "run"
    common = ["--backend", "transformers", "--model", str(tiny_model_dir), "--out", str(out)]
    ran = run_coheara("eval", str(gold_a), *common, "--adapter", "plain-a", env=env, timeout=300)
    assert ran.returncode == 0, ran.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["variant"], r["case"]) for r in records) == [
        ("adapter:plain-a", "plain-a1"),
        ("adapter:plain-a", "plain-a2"),
        ("base", "plain-a1"),
        ("base", "plain-a2"),
    ]
    for record in records:
        if record["response"] is not None:
            expected = None if record["variant"] == "base" else "plain-a"
            assert record["response"]["metadata"]["adapter"] == expected
    report = json.loads((out / "report.json").read_text())
    assert set(report["summary"]) == {"base", "adapter:plain-a", "strata"}
    assert "adapters against the base" in ran.stdout

    unknown = run_coheara("eval", str(gold_a), *common, "--adapter", "nope", env=env)
    assert unknown.returncode == 4
    lines = unknown.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown adapter 'nope' (registered: ")
    assert "plain-a" in lines[0]
    assert len((out / "results.jsonl").read_text().splitlines()) == 4  # nothing ran
