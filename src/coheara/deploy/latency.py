"""The founding spec's latency table, run against the configured backend (`coheara bench`).

Each scenario sends synthetic input of the stated size (no patient data: a fixed,
invented vocabulary) several times after a warm-up, and reports time to first token,
total time and output tokens per second as p50 and p95, beside the spec's expected range
and the 3 s point-of-care target.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from coheara import model_facts
from coheara.engine import Engine
from coheara.engine.result import GenerationResult
from coheara.errors import ContextOverflowError

POINT_OF_CARE_S = 3.0
CHARS_PER_TOKEN = 4.0
"""For sizing synthetic prompts where the backend reports no token counts; each row
reports the prompt tokens the backend counted."""
_PROSE = (
    "patient reports stable vital signs overnight with adequate oral intake and no new "
    "complaints; medication reconciliation completed; follow-up labs pending review; "
    "ambulating with assistance; wound clean and dry; plan discussed with the care team"
)


@dataclass(frozen=True)
class Scenario:
    id: str
    label: str
    prompt_tokens: int
    images: int
    expected_s: tuple[float, float]
    """The spec's expected total time on a GPU (low, high)."""
    point_of_care: bool


SCENARIOS = (
    Scenario("short_qa", "short QA (under 500 tokens)", 300, 0, (0.0, 1.0), True),
    Scenario("clinical_note", "clinical note (1K-5K tokens)", 2000, 0, (1.0, 3.0), True),
    Scenario("image_text", "image + text", 100, 1, (2.0, 5.0), False),
    Scenario("long_ehr", "long EHR context (10K-50K tokens)", 20000, 0, (3.0, 10.0), False),
)
FULL_CONTEXT = Scenario("full_context", "full 128K context", 120000, 0, (10.0, 30.0), False)


@dataclass
class Row:
    scenario: Scenario
    prompt_tokens: list[int] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    output_tokens: list[int] = field(default_factory=list)

    def add(self, result: GenerationResult) -> None:
        self.prompt_tokens.append(result.prompt_tokens)
        self.output_tokens.append(result.output_tokens)
        self.total_s.append(result.total_s)
        if result.time_to_first_token_s is not None:
            self.ttft_s.append(result.time_to_first_token_s)
        if result.tokens_per_s is not None:
            self.tokens_per_s.append(result.tokens_per_s)

    def summary(self) -> dict[str, Any]:
        total = percentiles(self.total_s)
        low, high = self.scenario.expected_s
        return {
            "scenario": asdict(self.scenario),
            "runs": len(self.total_s),
            "prompt_tokens": int(statistics.median(self.prompt_tokens))
            if self.prompt_tokens
            else 0,
            "output_tokens": int(statistics.median(self.output_tokens))
            if self.output_tokens
            else 0,
            "ttft_s": percentiles(self.ttft_s),
            "total_s": total,
            "tokens_per_s": percentiles(self.tokens_per_s),
            "expected_s": [low, high],
            "within_expected": total["p50"] is not None and total["p50"] <= high,
            "within_point_of_care": total["p50"] is not None and total["p50"] <= POINT_OF_CARE_S,
        }


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    ordered = np.asarray(values, dtype=float)
    return {"p50": float(np.percentile(ordered, 50)), "p95": float(np.percentile(ordered, 95))}


def synthetic_text(tokens: int, chars_per_token: float = CHARS_PER_TOKEN) -> str:
    """About `tokens` tokens of invented ward prose."""
    words: list[str] = []
    length = 0
    for word in itertools.cycle(_PROSE.split(" ")):
        if length >= tokens * chars_per_token:
            break
        words.append(word)
        length += len(word) + 1
    return " ".join(words)


def synthetic_image(seed: int = 0) -> np.ndarray:
    """A smooth 896x896 RGB image (a gradient with noise): the encoder's full cost."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, 896, dtype=np.float32)
    picture = (ramp[None, :, None] * 0.5 + ramp[:, None, None] * 0.5).repeat(3, axis=2)
    picture += rng.normal(0, 8, picture.shape).astype(np.float32)
    return np.clip(picture, 0, 255).astype(np.uint8)


async def run(
    engine: Engine,
    scenarios: list[Scenario],
    *,
    runs: int,
    warmup: int,
    max_tokens: int,
    scale: float,
    progress: Callable[[Scenario], None] | None = None,
) -> list[dict[str, Any]]:
    """Each scenario `warmup` times unmeasured, then `runs` times; one summary each.

    Prompts are sized in the backend's own tokens: one short call first measures how many
    characters its tokenizer makes a token (Gemma's about 4, the tiny test tokenizer's
    about 2), where the backend reports prompt tokens.
    """
    summaries = []
    window = await engine.context_window()
    chars_per_token = await _chars_per_token(engine)
    for scenario in scenarios:
        needs = int(scenario.prompt_tokens * scale) + max_tokens
        needs += scenario.images * model_facts.IMAGE_PROMPT_TOKENS
        if needs > window:
            summary = Row(scenario).summary()
            summary["skipped"] = f"needs about {needs} tokens; the window is {window}"
            summaries.append(summary)
            continue
        prompt = (
            synthetic_text(max(8, int(scenario.prompt_tokens * scale)), chars_per_token)
            + "\n\nSummarize the above in one sentence."
        )
        images = [synthetic_image(n) for n in range(scenario.images)]
        row = Row(scenario)
        try:
            for attempt in range(warmup + runs):
                result = await engine.generate(prompt, images=images, max_tokens=max_tokens)
                if attempt >= warmup:
                    row.add(result)
                if progress is not None:
                    progress(scenario)
        except ContextOverflowError as exc:  # the estimate above was short of the truth
            summary = Row(scenario).summary()
            summary["skipped"] = str(exc)
            summaries.append(summary)
            continue
        summaries.append(row.summary())
    return summaries


async def _chars_per_token(engine: Engine) -> float:
    sample = synthetic_text(400)
    result = await engine.generate(sample, max_tokens=1)
    if not result.prompt_tokens:
        return CHARS_PER_TOKEN
    return max(1.0, len(sample) / result.prompt_tokens)


def chart(summaries: list[dict[str, Any]], path: str, title: str) -> None:
    """Total time p50 (bar) and p95 (whisker) per scenario, the spec's expected range
    shaded, and the 3 s point-of-care line: readable at a glance."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from coheara.errors import ConfigurationError

        raise ConfigurationError(
            "charts need matplotlib", hint="pip install 'coheara[report]'"
        ) from None
    labels = [s["scenario"]["id"] for s in summaries]
    p50 = [s["total_s"]["p50"] or 0.0 for s in summaries]
    p95 = [s["total_s"]["p95"] or 0.0 for s in summaries]
    figure, axes = plt.subplots(figsize=(8, 4.5))
    positions = range(len(labels))
    colours = ["tab:green" if s["within_expected"] else "tab:red" for s in summaries]
    axes.bar(positions, p50, color=colours, label="total p50")
    axes.errorbar(
        positions,
        p50,
        yerr=np.array([[0.0] * len(p50), [max(0.0, b - a) for a, b in zip(p50, p95, strict=True)]]),
        fmt="none",
        ecolor="black",
        capsize=4,
        label="p95",
    )
    for x, summary in zip(positions, summaries, strict=True):
        low, high = summary["expected_s"]
        label = "spec range (GPU)" if x == 0 else None
        axes.fill_between([x - 0.4, x + 0.4], low, high, color="tab:blue", alpha=0.15, label=label)
    axes.axhline(POINT_OF_CARE_S, color="tab:orange", linestyle="--", label="3 s target")
    axes.set_xticks(list(positions), labels)
    axes.set_ylabel("seconds")
    axes.set_title(title)
    axes.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
