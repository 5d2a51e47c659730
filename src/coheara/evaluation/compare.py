"""Two reports side by side (`coheara eval --compare A B`) and the regression gate
(`coheara eval --gate BASELINE`): a prompt change is tested like code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from coheara.errors import InvalidRequestError
from coheara.evaluation import aggregate
from coheara.evaluation.report import by_task


@dataclass(frozen=True)
class Change:
    variant: str
    task: str
    metric: str
    before: float | None
    after: float | None

    @property
    def delta(self) -> float | None:
        if self.before is None or self.after is None:
            return None
        return self.after - self.before

    @property
    def direction(self) -> int:
        """+1 better, -1 worse, 0 same or not comparable, by the metric's own sense."""
        metric = aggregate.METRICS.get(self.metric)
        if self.delta is None or self.delta == 0 or metric is None or metric.neutral:
            return 0
        better = self.delta > 0 if metric.higher_is_better else self.delta < 0
        return 1 if better else -1

    def worse_beyond(self, tolerance: float, latency_tolerance: float) -> bool:
        """A drop past the tolerance: absolute for rates and scores, relative for times;
        a metric that vanished (computed before, not now) is a drop too."""
        metric = aggregate.METRICS.get(self.metric)
        if metric is None or metric.neutral:
            return False
        if self.before is not None and self.after is None:
            return True
        if self.direction >= 0 or self.delta is None or self.before is None:
            return False
        if metric.kind == "seconds":
            return abs(self.delta) > latency_tolerance * max(abs(self.before), 1e-9)
        if metric.kind == "per_100":  # the tolerance is a share: 0.02 is 2 per 100
            return abs(self.delta) > tolerance * 100
        return abs(self.delta) > tolerance


def pair_variants(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, str]]:
    """Variants to set side by side: the same names; or, two runs of one variant each
    (two backends, two prompt versions), those two."""
    left, right = by_task(a), by_task(b)
    common = [v for v in left if v in right]
    if common:
        return [(v, v) for v in common]
    if len(left) == 1 and len(right) == 1:
        return [(next(iter(left)), next(iter(right)))]
    return []


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[Change]:
    """Every metric of every task (and "all") present in either report."""
    left, right = by_task(a), by_task(b)
    changes = []
    for before_variant, after_variant in pair_variants(a, b):
        tasks_before, tasks_after = left[before_variant], right[after_variant]
        for task in sorted(set(tasks_before) | set(tasks_after)):
            before, after = tasks_before.get(task, {}), tasks_after.get(task, {})
            for metric in sorted(set(before) | set(after)):
                changes.append(
                    Change(
                        after_variant
                        if before_variant == after_variant
                        else f"{before_variant} -> {after_variant}",
                        task,
                        metric,
                        before.get(metric),
                        after.get(metric),
                    )
                )
    return changes


def within_run(report: dict[str, Any], base: str = "base") -> list[Change]:
    """Each adapter variant of one run against its base (`coheara eval --adapter`)."""
    variants = by_task(report)
    if base not in variants:
        return []
    changes = []
    for variant, tasks in variants.items():
        if variant == base:
            continue
        for task in sorted(set(variants[base]) | set(tasks)):
            before, after = variants[base].get(task, {}), tasks.get(task, {})
            for metric in sorted(set(before) | set(after)):
                changes.append(
                    Change(
                        f"{base} -> {variant}", task, metric, before.get(metric), after.get(metric)
                    )
                )
    return changes


def gate(
    baseline: dict[str, Any],
    current: dict[str, Any],
    *,
    tolerance: float,
    latency_tolerance: float,
) -> list[Change]:
    """The regressions: metrics worse than the baseline beyond the tolerances, on the tasks
    both runs evaluated ("all" only when they evaluated the same tasks: a run of a subset
    is judged task by task)."""

    def tasks(report: dict[str, Any]) -> set[str]:
        return {t for per_task in by_task(report).values() for t in per_task if t != "all"}

    before, after = tasks(baseline), tasks(current)
    judged = (before & after) | ({"all"} if before == after else set())
    if not before & after or not pair_variants(baseline, current):
        raise InvalidRequestError(
            "the gate has nothing to compare: the baseline and this run share no task "
            f"and variant (baseline: {', '.join(sorted(before)) or 'none'}; "
            f"this run: {', '.join(sorted(after)) or 'none'})",
            hint="gate against a baseline of the same tasks",
        )
    regressions = []
    for change in compare(baseline, current):
        if change.task not in judged:
            continue
        if change.worse_beyond(tolerance, latency_tolerance):
            regressions.append(change)
    return regressions
