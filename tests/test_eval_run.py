"""`coheara eval` end to end over a loopback Ollama fake that answers each case with a
scripted draft: scores, the report, resume after a killed run, compare and the gate."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cli_support import in_process
from coheara import Engine, Settings, model_facts
from coheara.evaluation import gold as goldsets
from coheara.evaluation import report as reporting
from coheara.evaluation.runner import BASE, RESULTS, read_records, run
from coheara.tasks import get_task
from coheara.tasks.sources import Sources
from fakes import FakeOllama, OllamaModel
from servers import serve

LAB = get_task("EXT-LAB")
REPORTS = {
    "lab-1": "Specimen LAB-ONE\nSodium | 138 | mmol/L\nPotassium | 5.9 | mmol/L",
    "lab-2": "Specimen LAB-TWO\nGlucose | 6.10 | mmol/L\nCreatinine | 168 | umol/L",
    "lab-3": "Specimen LAB-THREE\nHemoglobin | 102 | g/L\nPlatelets | 245 | x10^9/L",
}
GOLD = {
    "lab-1": {"Sodium": "138 mmol/L", "Potassium": "5.9 mmol/L"},
    "lab-2": {"Glucose": "6.1 mmol/L", "Creatinine": "168 umol/L"},  # 6.10 written as 6.1
    "lab-3": {"Hemoglobin": "102 g/L", "Platelets": "245 x10^9/L"},
}


def draft_for(case: str, *, drop: str | None = None) -> dict[str, Any]:
    """The accepted draft: each result line cited by its own source id and quoted."""
    data = LAB.input_model.model_validate({"report": REPORTS[case]})
    sources = Sources.from_input(data, skip=LAB.sources_skip)
    results = []
    for item in sources.items:
        parts = [p.strip() for p in item.text.split("|")]
        if len(parts) != 3 or parts[0] == drop:
            continue
        results.append(
            {
                "sources": [item.id],
                "quote": item.text,
                "test": parts[0],
                "value": parts[1],
                "unit": parts[2],
            }
        )
    return {"results": results}


def write_gold(folder: Path, *, refusal: bool = True) -> Path:
    lines = [
        {
            "id": case,
            "task": "EXT-LAB",
            "tags": {"sex": "female" if case != "lab-2" else "male"},
            "request": {"input": {"report": REPORTS[case]}},
            "expected": {"fields": GOLD[case], "draft": draft_for(case)},
        }
        for case in REPORTS
    ]
    if refusal:  # SLM-05 refuses any language but English, before the model is called
        lines.append(
            {
                "id": "plain-fr",
                "task": "SLM-05",
                "tags": {"sex": "male"},
                "request": {"input": {"text": "Take one tablet daily.", "target_language": "fr"}},
                "expected": {"refuse": True},
            }
        )
    path = folder / "gold.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


class Scripted:
    """Answers each case's prompt with its draft; `drop` removes one test from a case."""

    def __init__(self) -> None:
        self.drop: dict[str, str] = {}
        self.fake = FakeOllama({model_facts.DEFAULT_OLLAMA_MODEL: OllamaModel()})
        self.fake.reply = self.reply

    def reply(self, body: dict[str, Any]) -> str:
        prompt = json.dumps(body["messages"])
        for case in REPORTS:
            if _marker(case) in prompt:
                return json.dumps(draft_for(case, drop=self.drop.get(case)))
        return "{}"


def _marker(case: str) -> str:
    return REPORTS[case].splitlines()[0]


@pytest.fixture
def scripted() -> Iterator[tuple[Scripted, str]]:
    script = Scripted()
    with serve(script.fake.app) as url:
        yield script, url


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., Any]:
    return in_process(monkeypatch, capsys)


def engine_for(url: str) -> Engine:
    return Engine.from_config(settings=Settings(backend="ollama"), url=url)


def evaluate(url: str, gold: Path, out: Path, **kwargs: Any) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        async with engine_for(url) as engine:
            return await run(engine, [goldsets.load(gold)], [BASE], out, **kwargs)

    return asyncio.run(go())


def test_a_run_scores_each_case_and_writes_a_private_report(
    scripted: tuple[Scripted, str], tmp_path: Path
) -> None:
    _, url = scripted
    gold, out = write_gold(tmp_path), tmp_path / "run"
    records = evaluate(url, gold, out)
    by_case = {r["case"]: r for r in records}
    assert [r["status"] for r in records] == ["ok", "ok", "ok", "refused"]
    for case in REPORTS:  # the scripted drafts are the gold: every field right
        assert by_case[case]["quality"]["values"]["fields_f1"] == 1.0
        assert by_case[case]["compliance"]["schema_valid"] == 1
        assert by_case[case]["compliance"]["verified_share"] == 1.0
    refusal = by_case["plain-fr"]
    assert refusal["error"]["code"] == "task_refused" and refusal["response"] is None
    assert refusal["compliance"]["refusal_correct"] == 1

    report = reporting.write(out)
    lab = report["summary"]["base"]["EXT-LAB"]
    assert lab["fields_micro_f1"] == 1.0 and lab["cases"] == 3
    assert report["summary"]["base"]["SLM-05"]["refusal_correct"] == 1.0
    strata = report["summary"]["strata"]["sex"]["base"]
    assert strata["male"]["cases"] == 2 and strata["female"]["cases"] == 2
    page = (out / reporting.REPORT_HTML).read_text()
    assert "EXT-LAB" in page and "<table>" in page
    # Aggregates only: no report text, no draft, in the report files.
    for text in ("Potassium", "LAB-ONE", "mmol/L"):
        assert text not in page and text not in (out / reporting.REPORT_JSON).read_text()
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    assert stat.S_IMODE(out.stat().st_mode) == 0o700


def test_a_killed_run_resumes_with_nothing_lost_and_nothing_twice(
    scripted: tuple[Scripted, str], tmp_path: Path
) -> None:
    script, url = scripted
    gold, out = write_gold(tmp_path), tmp_path / "run"
    seen: list[str] = []

    def die_after_two(job: Any, record: dict[str, Any] | None) -> None:
        seen.append(job.case.id)
        if len(seen) == 2:
            raise KeyboardInterrupt  # the operator's Ctrl-C, between two cases

    with pytest.raises(KeyboardInterrupt):
        evaluate(url, gold, out, progress=die_after_two)
    assert [r["case"] for r in read_records(out)] == ["lab-1", "lab-2"]
    with (out / RESULTS).open("a") as handle:  # a kill in the middle of a write
        handle.write('{"case": "lab-3", "variant": "base", "sta')
    calls_before = len(script.fake.chat_bodies)

    records = evaluate(url, gold, out)
    assert [r["case"] for r in records] == ["lab-1", "lab-2", "lab-3", "plain-fr"]
    assert len(script.fake.chat_bodies) == calls_before + 1  # only lab-3 went to the model
    lines = (out / RESULTS).read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)
    # A third run has nothing left to do.
    assert len(evaluate(url, gold, out)) == 4 and len(script.fake.chat_bodies) == calls_before + 1


def test_the_gate_fails_on_a_planted_regression_and_compare_says_what_moved(
    scripted: tuple[Scripted, str], tmp_path: Path, cli: Callable[..., Any]
) -> None:
    script, url = scripted
    gold = write_gold(tmp_path, refusal=False)
    backend = ["--backend", "ollama", "--url", url]
    baseline = cli("eval", str(gold), "--out", str(tmp_path / "baseline"), *backend)
    assert baseline.returncode == 0, baseline.stderr
    assert "Fields micro F1" in baseline.stdout or "fields_micro_f1" in baseline.stdout

    script.drop = {"lab-2": "Creatinine"}  # the "new prompt" loses one result
    current = tmp_path / "current"
    gated = cli(
        "eval", str(gold), "--out", str(current), *backend, "--gate", str(tmp_path / "baseline")
    )
    assert gated.returncode == 13, gated.stderr
    error_lines = [line for line in gated.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "dropped beyond the tolerance" in error_lines[0]
    assert "Traceback" not in gated.stderr
    # The same runs with a tolerance wider than the drop pass (the run is reused, not redone).
    calls = len(script.fake.chat_bodies)
    loose = cli(
        "eval",
        str(gold),
        "--out",
        str(current),
        *backend,
        "--gate",
        str(tmp_path / "baseline"),
        "--tolerance",
        "0.5",
    )
    assert loose.returncode == 0, loose.stderr
    assert len(script.fake.chat_bodies) == calls

    compared = cli("eval", "--compare", str(tmp_path / "baseline"), str(current))
    assert compared.returncode == 0, compared.stderr
    assert "worse" in compared.stdout and "EXT-LAB" in compared.stdout


def test_a_folder_of_another_run_and_a_bad_gold_set_are_one_line_errors(
    scripted: tuple[Scripted, str], tmp_path: Path, cli: Callable[..., Any]
) -> None:
    _, url = scripted
    backend = ["--backend", "ollama", "--url", url]
    out = tmp_path / "run"
    first = write_gold(tmp_path, refusal=False)
    assert cli("eval", str(first), "--out", str(out), *backend).returncode == 0
    other = tmp_path / "other.jsonl"
    other.write_text(first.read_text().replace("lab-1", "lab-9"))
    mixed = cli("eval", str(other), "--out", str(out), *backend)
    assert mixed.returncode == 4 and "holds another run" in mixed.stderr

    broken = tmp_path / "broken.jsonl"
    broken.write_text(first.read_text().splitlines()[0] + "\n{not json\n")
    bad = cli("eval", str(broken), "--out", str(tmp_path / "b"), *backend)
    assert bad.returncode == 4
    assert bad.stderr.strip().splitlines() == [
        "error: broken.jsonl line 2: not JSON (Expecting property name enclosed in double "
        "quotes at column 2)"
    ]


def test_the_shipped_gold_sets_run_on_the_in_process_model(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The Transformers path with shipped sets, an image task included: the random model's
    drafts score low, but every case ends in a record and the manifest pins the prompts."""
    monkeypatch.setenv("COHEARA_MAX_OUTPUT_TOKENS", "16")
    cli = in_process(monkeypatch, capsys)
    out = tmp_path / "run"
    ran = cli(
        "eval",
        "--task",
        "EXT-LAB",
        "--task",
        "img-cxr",
        "--limit",
        "1",
        "--backend",
        "transformers",
        "--model",
        str(tiny_model_dir),
        "--out",
        str(out),
    )
    assert ran.returncode == 0, ran.stderr
    records = read_records(out)
    assert [(r["task"], r["variant"]) for r in records] == [
        ("EXT-LAB", "base"),
        ("IMG-CXR", "base"),
    ]
    assert all(r["status"] in ("ok", "error") for r in records)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "transformers"
    assert manifest["prompts"]["IMG-CXR"]["prompt_hash"] == get_task("IMG-CXR").prompt_hash
    assert {g["file"] for g in manifest["gold_sets"]} == {"ext-lab.jsonl", "img-cxr.jsonl"}
    assert "IMG-CXR" in (out / reporting.REPORT_HTML).read_text()


def test_a_run_killed_with_sigkill_mid_call_loses_nothing(
    scripted: tuple[Scripted, str], tmp_path: Path
) -> None:
    """`coheara eval` in its own process, killed (SIGKILL) while a case is at the model:
    the rerun keeps what was written, redoes the case that was cut, counts each case once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script, url = scripted
    script.fake.first_token_delay_s = 0.4
    gold, out = write_gold(tmp_path, refusal=False), tmp_path / "run"
    command = [sys.executable, "-m", "coheara.cli.main", "eval", str(gold), "--out", str(out)]
    command += ["--backend", "ollama", "--url", url]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            results = out / RESULTS
            if results.exists() and results.read_text().count("\n") >= 1:
                break
            time.sleep(0.02)
        time.sleep(0.1)  # the next case is now waiting on the model
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    kept = [r["case"] for r in read_records(out)]
    assert 1 <= len(kept) < 3

    script.fake.first_token_delay_s = 0.0
    records = evaluate(url, gold, out)
    assert sorted(r["case"] for r in records) == ["lab-1", "lab-2", "lab-3"]
    assert [r["case"] for r in records][: len(kept)] == kept
    assert len((out / RESULTS).read_text().splitlines()) == 3


def test_what_would_count_twice_or_vanish_is_refused(
    scripted: tuple[Scripted, str], tmp_path: Path
) -> None:
    from coheara.errors import InvalidRequestError
    from coheara.evaluation.runner import LOCK, Variant, jobs

    _, url = scripted
    gold = write_gold(tmp_path)
    # The same case id in two gold sets would run once.
    twin = tmp_path / "twin" / "gold.jsonl"
    twin.parent.mkdir()
    twin.write_text(gold.read_text())

    async def both() -> None:
        async with engine_for(url) as engine:
            await run(engine, [goldsets.load(gold), goldsets.load(twin)], [BASE], tmp_path / "x")

    with pytest.raises(InvalidRequestError, match=r"case id lab-1 is in both gold\.jsonl and gold"):
        asyncio.run(both())
    # A second run on a folder being written is refused, not interleaved.
    out = tmp_path / "run"
    evaluate(url, gold, out)
    import fcntl

    with open(out / LOCK, "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(InvalidRequestError, match="another coheara eval is writing"):
            evaluate(url, gold, out)
    # A folder that is not a run is never written into.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(InvalidRequestError, match="not empty and holds no run"):
        evaluate(url, gold, other)
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"]
    # An adapter's variant runs only its own task's cases.
    adapter = Variant.for_adapter("plain-v1", "SLM-05")
    picked = [job.case.id for job in jobs([goldsets.load(gold)], [BASE, adapter])]
    assert picked == ["lab-1", "lab-2", "lab-3", "plain-fr", "plain-fr"]


def test_reading_a_run_never_changes_it_and_damage_is_reported(
    scripted: tuple[Scripted, str], tmp_path: Path
) -> None:
    from coheara.errors import InvalidRequestError

    _, url = scripted
    gold, out = write_gold(tmp_path), tmp_path / "run"
    evaluate(url, gold, out)
    results = out / RESULTS
    with results.open("a") as handle:
        handle.write('{"case": "torn')
    size = results.stat().st_size
    assert len(reporting.load(out)["summary"]["base"]["EXT-LAB"]) > 0
    assert results.stat().st_size == size  # a reader leaves the torn line to the writer
    lines = results.read_text().splitlines()
    lines[1] = lines[1][:40]  # damage in the middle: never silently dropped
    results.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidRequestError, match=r"results.jsonl line 2 is damaged"):
        reporting.load(out)
    bad = tmp_path / "report.json"
    bad.write_text('{"summary": {"base": {"EXT-LAB": {"cases": "many"}}}}')
    with pytest.raises(InvalidRequestError, match="not a report of coheara eval"):
        reporting.load(bad)


def test_a_backend_outage_stops_the_run_and_the_rerun_finishes_it(
    scripted: tuple[Scripted, str], tmp_path: Path
) -> None:
    from coheara.errors import BackendUnavailableError

    script, url = scripted
    gold, out = write_gold(tmp_path, refusal=False), tmp_path / "run"

    def outage_after_first(job: Any, record: dict[str, Any] | None) -> None:
        script.fake.fail_with = (503, "server busy, please try again")

    with pytest.raises(BackendUnavailableError):
        evaluate(url, gold, out, progress=outage_after_first)
    assert [r["case"] for r in read_records(out)] == ["lab-1"]  # the outage is not a result
    script.fake.fail_with = None
    records = evaluate(url, gold, out)
    assert [r["status"] for r in records] == ["ok", "ok", "ok"]


def test_the_gate_refuses_a_baseline_it_cannot_compare(
    scripted: tuple[Scripted, str], tmp_path: Path, cli: Callable[..., Any]
) -> None:
    _, url = scripted
    gold = write_gold(tmp_path)
    backend = ["--backend", "ollama", "--url", url]
    plain = tmp_path / "plain"
    assert cli("eval", str(gold), "--task", "SLM-05", "--out", str(plain), *backend).returncode == 0
    gated = cli(
        "eval", str(gold), "--task", "EXT-LAB", "--out", str(tmp_path / "lab"), *backend,
        "--gate", str(plain),
    )  # fmt: skip
    assert gated.returncode == 4
    assert "the gate has nothing to compare" in gated.stderr and "Traceback" not in gated.stderr


def test_a_gold_line_the_task_cannot_take_fails_at_load_by_line(tmp_path: Path) -> None:
    from coheara.errors import InvalidRequestError

    base = {"id": "c1", "task": "SLM-05", "request": {"input": {"text": "Rest."}}}
    cases = [
        ({**base, "request": {"input": "hello"}}, r"line 1: request\.input: Input should be"),
        ({**base, "request": {"input": {"txt": "Rest."}}}, r"line 1: input for SLM-05 is invalid"),
        ({**base, "images": ["../../etc/passwd"]}, r"line 1: an image path leaves"),
        ({**base, "tags": {"Patient Jane Doe": 5}}, r"line 1: tags\.\[key\]: Input should be"),
        ({**base, "request": {"input": {"text": "Rest."}, "fhir": "x"}}, r"request\.fhir"),
    ]
    for line, message in cases:
        path = tmp_path / "g.jsonl"
        path.write_text(json.dumps(line) + "\n")
        with pytest.raises(InvalidRequestError, match=message) as caught:
            goldsets.load(path)
        assert "Jane" not in str(caught.value)
    path.write_bytes(b'{"id": "\xff"}\n')
    with pytest.raises(InvalidRequestError, match="not UTF-8 JSON"):
        goldsets.load(path)
    path.write_text("[" * 100_000 + "\n")
    with pytest.raises(InvalidRequestError, match="line 1"):
        goldsets.load(path)
