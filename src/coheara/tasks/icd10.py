"""The official ICD-10-CM code table (as shipped in `simple-icd-10-cm`), for SLM-02.

A suggested code is looked up here, never trusted: whether it exists, whether it is a
billable leaf, and its official description (which always replaces the model's).
The table takes a few seconds to load, so it is loaded on first use, not on import:
listing the tasks must stay instant.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from functools import cache
from types import ModuleType

_SHAPE = re.compile(r"^[A-Z][0-9][0-9A-Z](?:\.?[0-9A-Z]{1,4})?$")
"""A letter, a digit, a digit or letter (category), then up to four more characters."""


@dataclass(frozen=True)
class IcdEntry:
    """What the table says about one code."""

    code: str
    """Dotted form, e.g. `I50.9`."""
    description: str
    billable: bool
    """A leaf of the table: a code that can be reported on a claim."""


@cache
def _table() -> ModuleType:
    with warnings.catch_warnings():
        # The package reads its data with a deprecated importlib call.
        warnings.simplefilter("ignore", DeprecationWarning)
        import simple_icd_10_cm

    return simple_icd_10_cm


def normalize(code: str) -> str:
    """`' i509 '` -> `I50.9`: upper case, no spaces, the dot after the category. A string
    that does not look like an ICD-10-CM code comes back upper-cased and unchanged."""
    text = re.sub(r"\s+", "", code).upper().rstrip(".")
    if not _SHAPE.match(text):
        return text
    bare = text.replace(".", "")
    return bare if len(bare) == 3 else f"{bare[:3]}.{bare[3:]}"


def lookup(code: str) -> IcdEntry | None:
    """The table's entry for a code (any spelling `normalize` accepts), or None when it is
    not an ICD-10-CM code: chapters and blocks (`I30-I5A`) are not codes either."""
    dotted = normalize(code)
    if not _SHAPE.match(dotted):
        return None
    table = _table()
    if not table.is_valid_item(dotted) or table.is_chapter_or_block(dotted):
        return None
    return IcdEntry(dotted, table.get_description(dotted), bool(table.is_leaf(dotted)))


def billable_children(code: str) -> list[IcdEntry]:
    """The billable codes under a category or subcategory, in table order."""
    dotted = normalize(code)
    table = _table()
    if not table.is_valid_item(dotted):
        return []
    return [
        IcdEntry(child, table.get_description(child), True)
        for child in table.get_descendants(dotted)
        if table.is_leaf(child)
    ]


def preload() -> None:
    """Load the table now (a few seconds), e.g. when a server starts, so that the first
    SLM-02 request does not pay for it."""
    _table()
