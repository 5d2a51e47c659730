"""The checks every task shares: citations verified, numbers found in the input, gaps parsed.

- Every element that carries `sources`/`quote` (see `Cited`) is traced: the quote must
  occur in a cited item (verified), or at least somewhere in the input (verified
  elsewhere, flagged); otherwise it is unverified and flagged, and an element with
  text but no citation at all is an unsupported statement, never silently passed.
- Numbers in the draft's text (vitals, doses, lab values, dates) must occur in the
  input; one that does not is flagged as possible fabrication.
- The model's own `INSUFFICIENT DATA: x`, `DOCUMENTATION GAP: x`, `EVIDENCE GAP: x`
  markers become gaps.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Literal

from coheara.tasks.envelope import SectionConfidence, TraceLink
from coheara.tasks.sources import numbers_in
from coheara.tasks.spec import GAP_MARKERS, Review, is_gap_marker

_MARKER = re.compile(
    r"\b("
    + "|".join(GAP_MARKERS)
    + r")\s*[:\-]\s*(.{0,400}?)(?=\n|$|(?:"
    + "|".join(GAP_MARKERS)
    + r"))",
    re.IGNORECASE,
)
LinkStatus = Literal["verified", "verified_elsewhere", "unverified", "uncited", "unknown_source"]
Level = Literal["high", "medium", "low", "unknown"]
_GAP_KIND = {
    "INSUFFICIENT DATA": "insufficient_data",
    "DOCUMENTATION GAP": "documentation_gap",
    "EVIDENCE GAP": "evidence_gap",
}


def run_shared_checks(review: Review) -> None:
    """Trace, numbers and gap markers, in that order (the task's own checks come after)."""
    trace_citations(review)
    check_numbers(review)
    parse_gap_markers(review)


def _elements(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, value
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _elements(inner, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from _elements(inner, f"{path}[{index}]")


def _statement_text(element: dict[str, Any]) -> str:
    """The words an element states, besides its citation."""
    return " ".join(
        str(v) for k, v in element.items() if isinstance(v, str) and k not in ("quote",)
    ).strip()


def trace_citations(review: Review) -> None:
    sources = review.sources
    for path, element in _elements(review.draft):
        if not isinstance(element, dict) or ("sources" not in element and "quote" not in element):
            continue
        cited = [str(s) for s in element.get("sources") or []]
        quote = str(element.get("quote") or "")
        text = _statement_text(element)
        if not cited and not quote.strip():
            markers = any(is_gap_marker(v) for k, v in element.items() if isinstance(v, str))
            if text and not markers:
                review.links.append(TraceLink(element=path, sources=[], status="uncited"))
                review.flag(
                    "statement_uncited",
                    "this element cites no source",
                    element=path,
                    severity="warning",
                )
                review.gap("unsupported_statement", "an element cites no source", element=path)
            continue
        unknown = [s for s in cited if s not in sources.by_id]
        found_in = sources.find(quote) if quote.strip() else []
        status: LinkStatus
        if quote.strip() and any(sources.contains(s, quote) for s in cited):
            status = "verified"
        elif found_in:
            status = "verified_elsewhere"
            review.flag(
                "quote_in_other_source",
                f"the quote is in {', '.join(found_in[:3])}, not in the cited "
                f"{', '.join(cited[:3]) or 'items'}",
                element=path,
                severity="info",
            )
        elif unknown and not quote.strip():
            status = "unknown_source"
        else:
            status = "unverified"
        if unknown:
            review.flag(
                "unknown_source",
                f"cites {', '.join(unknown[:3])}, which the input does not have",
                element=path,
                severity="warning",
            )
        if status in ("unverified", "unknown_source"):
            review.flag(
                "quote_unverified",
                "the quote does not occur in the input"
                if quote.strip()
                else "no quote to verify the citation",
                element=path,
                severity="warning",
            )
            review.gap("unsupported_statement", "its evidence could not be verified", element=path)
        review.links.append(
            TraceLink(element=path, sources=cited, quote=quote, status=status, found_in=found_in)
        )


def check_numbers(review: Review) -> None:
    known = review.sources.numbers()
    exempt = set(review.spec.number_exempt)
    for path, element in _elements(review.draft):
        if not isinstance(element, str) or _last_key(path) in exempt or is_gap_marker(element):
            continue
        invented = sorted(numbers_in(element) - known)
        if invented:
            review.flag(
                "number_not_in_input",
                f"{', '.join(invented[:5])} does not occur in the input: possible fabrication",
                element=path,
                severity="error",
            )


def parse_gap_markers(review: Review) -> None:
    seen: set[tuple[str, str]] = set()
    for path, element in _elements(review.draft):
        if not isinstance(element, str):
            continue
        for match in _MARKER.finditer(element):
            kind = _GAP_KIND[match.group(1).upper()]
            detail = match.group(2).strip().rstrip(".;") or "unspecified"
            if (kind, detail) not in seen:
                seen.add((kind, detail))
                review.gap(kind, detail, element=_parent(path))


def confidence(review: Review) -> dict[str, SectionConfidence]:
    """Per top-level section: the share of its cited elements whose quotes were verified,
    lowered by any error found in it. Computed, never the model's own claim."""
    out: dict[str, SectionConfidence] = {}
    for section in review.draft:
        links = [link for link in review.links if _section(link.element) == section]
        errors = [
            f
            for f in review.findings
            if f.severity == "error" and f.element and _section(f.element) == section
        ]
        if not links:
            out[section] = SectionConfidence(statements=0, level="low" if errors else "unknown")
            continue
        share = sum(link.status == "verified" for link in links) / len(links)
        level: Level = "high" if share >= 0.9 else "medium" if share >= 0.5 else "low"
        if errors:
            level = "low"
        out[section] = SectionConfidence(
            statements=len(links), verified_share=round(share, 3), level=level
        )
    return out


def _section(path: str) -> str:
    return re.split(r"[.\[]", path, maxsplit=1)[0]


def _last_key(path: str) -> str:
    return re.sub(r"\[\d+\]$", "", path).rsplit(".", 1)[-1]


def _parent(path: str) -> str:
    for suffix in (".text", ".quote"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path
