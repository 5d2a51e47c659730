"""EXT-EHR: fields a caller names in a JSON Schema, extracted from EHR text with evidence.

The caller sends the text and a JSON Schema of the object it wants. A task's output
model is fixed, so the model does not write the caller's object: it writes a flat list
of `{sources, quote, name, value}` entries, one per field it found, each cited (a list
field may have several). The layer assembles the caller's object (`record`) in code:

- only names of the caller's schema are kept (matched exactly, else ignoring case,
  spaces and hyphens, and renamed); other entries are removed and flagged;
- a value enters `record` only when its citation is verified, it converts to the
  field's type (integer, number, boolean, string, or a list of them; a number is taken
  from the value only when it holds exactly one) and it satisfies the field's own
  schema (enum, minimum, pattern, ...); a number must also be written in the cited
  item. Otherwise the entry stays in `fields`, flagged, and out of `record`;
- a field given twice (not a list) keeps its first accepted entry; the others go;
- the model's `INSUFFICIENT DATA: ...` entries leave `fields` and become gaps; every
  required field with no accepted value is an `insufficient_data` gap;
- `record` is validated against the whole caller's schema (jsonschema); `record_valid`
  says whether it passed, required fields included; other violations are errors.

Supported caller schemas: an object whose properties are strings, numbers, integers,
booleans (each optionally nullable, with enum and the usual keywords), arrays of those,
or nested objects of the same (up to three levels; nested names are dotted, e.g.
`vitals.heart_rate`); at most 60 fields; no `$ref`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import SkipJsonSchema

from coheara.tasks.envelope import ArtifactContext
from coheara.tasks.sources import normalize, numbers_in
from coheara.tasks.spec import Cited, Review, TaskSpec, is_gap_marker

MAX_FIELDS = 60
MAX_DEPTH = 3
Kind = Literal["string", "integer", "number", "boolean"]
_TRUE = {"yes", "y", "true", "present", "positive", "current", "confirmed"}
_FALSE = {"no", "n", "false", "absent", "negative", "denies", "denied", "none"}
_KINDS: dict[str, Kind] = {k: k for k in ("string", "integer", "number", "boolean")}
_KEY = re.compile(r"[\s\-]+")

# ----- the caller's schema ------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    """One field of the caller's schema, as the model sees it and the layer checks it."""

    name: str
    """Dotted path: `vitals.heart_rate`."""
    kind: Kind
    schema: dict[str, Any]
    """The field's own schema (for a list: its items' schema)."""
    array: bool
    required: bool
    """Required at every level of its path."""
    max_items: int | None = None


def _scalar(node: dict[str, Any], where: str) -> tuple[Kind | None, dict[str, Any]]:
    """The field's kind and its schema without `null` (None: not a scalar)."""
    for key in ("anyOf", "oneOf"):
        if key in node:
            branches = [
                b for b in node[key] if not (isinstance(b, dict) and b.get("type") == "null")
            ]
            if len(branches) != 1 or not isinstance(branches[0], dict):
                raise ValueError(f"{where}: {key} is supported only as 'X or null'")
            merged = {k: v for k, v in node.items() if k != key} | branches[0]
            return _scalar(merged, where)
    kind = node.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        if len(kinds) != 1:
            raise ValueError(f"{where}: a field must have one type (or that type or null)")
        kind = kinds[0]
    if kind is None and isinstance(node.get("enum"), list):
        kind = "string"
    return (_KINDS.get(kind) if isinstance(kind, str) else None), node


def schema_fields(schema: dict[str, Any]) -> list[Leaf]:
    """The caller's schema as a flat list of fields; ValueError says what is unsupported
    (names schema paths only, never values)."""
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"not a valid JSON Schema: {exc.message[:200]}") from None
    if "$ref" in str(schema):
        raise ValueError("$ref is not supported: inline the definitions")
    leaves: list[Leaf] = []
    _collect(schema, "", True, 1, leaves)
    if not leaves:
        raise ValueError("the schema must be an object with at least one property")
    if len(leaves) > MAX_FIELDS:
        raise ValueError(f"{len(leaves)} fields: at most {MAX_FIELDS}")
    return leaves


def _collect(node: dict[str, Any], path: str, required: bool, depth: int, out: list[Leaf]) -> None:
    if node.get("type") != "object" and "properties" not in node:
        raise ValueError(f"{path or 'the schema'}: must be an object with properties")
    if depth > MAX_DEPTH:
        raise ValueError(f"{path}: objects nested deeper than {MAX_DEPTH} levels")
    needed = set(node.get("required") or [])
    for key, child in (node.get("properties") or {}).items():
        name = f"{path}.{key}" if path else str(key)
        if not isinstance(child, dict) or len(name) > 120:
            raise ValueError(f"{name[:120]}: unsupported field")
        here = required and key in needed
        kind, scalar = _scalar(child, name)
        if kind is not None:
            out.append(Leaf(name, kind, scalar, False, here))
            continue
        if child.get("type") == "array" or "items" in child:
            items = child.get("items")
            kind, scalar = _scalar(items, name) if isinstance(items, dict) else (None, {})
            if kind is None:
                raise ValueError(f"{name}: only lists of strings, numbers or booleans")
            out.append(Leaf(name, kind, scalar, True, here, child.get("maxItems")))
            continue
        if child.get("type") == "object" or "properties" in child:
            _collect(child, name, here, depth + 1, out)
            continue
        raise ValueError(
            f"{name}: give it a type (string, number, integer, boolean, array, object)"
        )


# ----- input --------------------------------------------------------------------------


class EhrFieldsInput(BaseModel):
    """EHR text, and the JSON Schema of the object the caller wants from it."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(
        min_length=1,
        max_length=400_000,
        description="The EHR text: notes, summaries, letters (several may be joined).",
    )
    field_schema: dict[str, Any] = Field(
        description="A JSON Schema of an object: the fields to extract, with their types, "
        "descriptions, enums and which are required (nested objects allowed, 3 levels).",
    )

    @field_validator("field_schema")
    @classmethod
    def _supported(cls, value: dict[str, Any]) -> dict[str, Any]:
        schema_fields(value)
        return value

    def leaves(self) -> list[Leaf]:
        return schema_fields(self.field_schema)


# ----- output -------------------------------------------------------------------------


class ExtractedField(Cited):
    """One field value found in the text, with the words that state it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=120, description="The field's name exactly as listed.")
    value: str = Field(
        max_length=500, description="As written in the text; yes or no for a yes/no field."
    )


class EhrFieldsDraft(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fields: list[ExtractedField] = Field(default_factory=list, max_length=60)
    record: SkipJsonSchema[dict[str, Any]] = Field(
        default_factory=dict,
        description="Built by the layer: the caller's object, from the accepted fields only.",
    )
    record_valid: SkipJsonSchema[bool] = Field(
        False, description="Built by the layer: `record` validates against the caller's schema."
    )


# ----- prompt -------------------------------------------------------------------------

SYSTEM_PROMPT = """\
You are a clinical data abstraction assistant. You read text from a patient's electronic \
health record and find the values of the fields you are given. Your entries are a draft \
that is checked against the text and reviewed before any use.

Rules you must follow:
- Take every value from the text. Copy values as written (numbers with their units as \
the text gives them); for a yes/no field write yes or no; for a field with listed \
options write one of the options.
- Never guess, infer beyond what is written, calculate or invent a value, a date or a \
number. A value you cannot find is missing, not estimated.
- When the text contradicts itself, take the most recent statement and say so nowhere \
else: the reviewer sees your quote.
- Use the field names exactly as listed. Do not add fields that are not listed.
- Do not interpret findings, suggest diagnoses or give advice."""


def _describe(leaf: Leaf) -> str:
    kind = {"boolean": "yes/no", "integer": "whole number"}.get(leaf.kind, leaf.kind)
    parts = [kind + (", a list: one entry per item" if leaf.array else "")]
    if leaf.required:
        parts.append("required")
    options = leaf.schema.get("enum")
    if isinstance(options, list):
        parts.append("one of: " + " | ".join(str(o)[:40] for o in options[:20]))
    line = f"- {leaf.name} ({'; '.join(parts)})"
    about = leaf.schema.get("description") or leaf.schema.get("title")
    return f"{line}: {str(about)[:200]}" if about else line


def _instruction(data: EhrFieldsInput, context: ArtifactContext | None) -> str:
    fields = "\n".join(_describe(leaf) for leaf in data.leaves())
    return (
        "Find the values of these fields in the EHR text in the SOURCES:\n"
        f"{fields}\n\n"
        "For each value found, write one entry: sources and quote (the exact words that "
        "state it), name (the field's name exactly as listed), value. A list field may "
        "have several entries. For a required field the text does not state, write one "
        "entry with value `INSUFFICIENT DATA: <field name>` and no sources. Leave out "
        "optional fields the text does not state."
    )


# ----- checks -------------------------------------------------------------------------


def _key(name: str) -> str:
    return _KEY.sub("_", name.strip()).casefold()


def _convert(leaf: Leaf, value: str) -> tuple[bool, Any]:
    """The entry's value as the field's JSON type: (ok, value)."""
    text = value.strip()
    if leaf.kind == "string":
        options = leaf.schema.get("enum")
        if isinstance(options, list):
            for option in options:
                if isinstance(option, str) and normalize(option) == normalize(text):
                    return True, option
            return False, None
        return bool(text), text
    if leaf.kind == "boolean":
        word = normalize(text).rstrip(".")
        if word in _TRUE:
            return True, True
        if word in _FALSE:
            return True, False
        return False, None
    found = re.findall(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?", text)
    if len(found) != 1:
        return False, None
    number = float(found[0].replace(",", ""))
    if leaf.kind == "integer":
        return (True, int(number)) if number.is_integer() else (False, None)
    return True, number


def _cited_has_number(review: Review, entry: dict[str, Any]) -> bool:
    wanted = numbers_in(str(entry.get("value", "")))
    for source_id in entry.get("sources") or []:
        item = review.sources.by_id.get(str(source_id))
        if item is not None and wanted <= numbers_in(item.text):
            return True
    return False


def _set(record: dict[str, Any], name: str, value: Any) -> None:
    *parents, last = name.split(".")
    for part in parents:
        record = record.setdefault(part, {})
    record[last] = value


def _judge(
    review: Review, leaf: Leaf, entry: dict[str, Any], element: str
) -> tuple[str | None, Any]:
    """(why the entry's value cannot enter the record, or None; the converted value)."""
    ok, converted = _convert(leaf, str(entry.get("value", "")))
    if review.status(element) not in ("verified", "verified_elsewhere"):
        return "its citation is not verified", None
    if not ok:
        options = " among the field's options" if "enum" in leaf.schema else ""
        return f"the value is not a {leaf.kind}{options}", None
    if leaf.kind in ("integer", "number") and not _cited_has_number(review, entry):
        return "the number is not written in the cited item", None
    errors = list(jsonschema.Draft202012Validator(leaf.schema).iter_errors(converted))
    if errors:
        return f"the value breaks the field's '{errors[0].validator}' rule", None
    return None, converted


def check_fields(review: Review) -> None:
    """Known names only; values converted, verified and checked; the caller's object
    assembled and validated; missing required fields as gaps."""
    data: EhrFieldsInput = review.data
    entries = review.draft.get("fields")
    if not isinstance(entries, list):
        return
    leaves = data.leaves()
    by_name = {leaf.name: leaf for leaf in leaves}
    by_key = {_key(leaf.name): leaf for leaf in leaves}
    said_missing: dict[str, str] = {}
    flags: list[tuple[str, str, str | None, Literal["warning", "info"]]] = []
    judged: list[tuple[int, Leaf, str | None, Any]] = []  # (index, field, problem, value)
    for index, entry in enumerate(entries):
        element = f"fields[{index}]"
        name = str(entry.get("name", ""))
        leaf = by_name.get(name) or by_key.get(_key(name))
        if leaf is None:
            flags.append(
                (
                    "field_not_in_schema",
                    f"model's {element} removed: its name is not a field of the caller's schema",
                    None,
                    "warning",
                )
            )
            continue
        entry["name"] = leaf.name
        value = str(entry.get("value", ""))
        if is_gap_marker(value):
            # The model says the text does not state it: a gap, not an entry of the draft.
            said_missing.setdefault(leaf.name, value.strip()[:300])
            review.findings[:] = [
                f
                for f in review.findings
                if not (f.element == element and f.rule == "statement_uncited")
            ]
            continue
        problem, converted = _judge(review, leaf, entry, element)
        judged.append((index, leaf, problem, converted))
    # A field that is not a list keeps one entry: its first accepted one, else its first.
    keep: dict[str, int] = {}
    for index, leaf, problem, _ in judged:
        if leaf.array:
            continue
        if leaf.name not in keep or (problem is None and _problem_of(judged, keep[leaf.name])):
            keep[leaf.name] = index
    mapping: dict[int, int | None] = {index: None for index in range(len(entries))}
    kept: list[dict[str, Any]] = []
    accepted: dict[str, list[Any]] = {}
    for index, leaf, problem, converted in judged:
        element = f"fields[{index}]"
        if not leaf.array and keep[leaf.name] != index:
            flags.append(
                (
                    "field_repeated",
                    f"model's {element} removed: {leaf.name} is not a list and was given "
                    "more than once (one entry kept)",
                    None,
                    "info",
                )
            )
            continue
        if problem is None:
            accepted.setdefault(leaf.name, []).append(converted)
        else:
            flags.append(
                (
                    "field_not_accepted",
                    f"{leaf.name} left out of the record: {problem}",
                    element,
                    "warning",
                )
            )
        mapping[index] = len(kept)
        kept.append(entries[index])
    for rule, message, where, severity in flags:
        review.flag(rule, message, element=where, severity=severity)
    review.reindex("fields", mapping)
    review.draft["fields"] = kept
    record: dict[str, Any] = {}
    for leaf in leaves:
        values = accepted.get(leaf.name)
        if values:
            _set(record, leaf.name, _dedupe(values)[: leaf.max_items] if leaf.array else values[0])
    review.draft["record"] = record
    for leaf in leaves:
        if leaf.name in said_missing and leaf.name not in accepted:
            review.gap(
                "insufficient_data",
                f"{leaf.name}: {said_missing[leaf.name]}",
                element=f"record.{leaf.name}",
            )
        elif leaf.required and leaf.name not in accepted:
            review.gap(
                "insufficient_data",
                f"{leaf.name} (required) was not found with verified evidence",
                element=f"record.{leaf.name}",
            )
    _validate_record(review, data.field_schema, record)


def _problem_of(judged: list[tuple[int, Leaf, str | None, Any]], index: int) -> str | None:
    return next(problem for i, _, problem, _ in judged if i == index)


def _dedupe(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for value in values:
        if value not in out:
            out.append(value)
    return out


def _validate_record(review: Review, schema: dict[str, Any], record: dict[str, Any]) -> None:
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(record),
        key=lambda e: [str(p) for p in e.absolute_path],
    )
    others = [e for e in errors if e.validator != "required"]
    for error in others[:10]:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        review.flag(
            "record_invalid",
            f"the assembled record breaks the caller's schema at {where}: '{error.validator}' rule",
            element="record",
            severity="error",
        )
    missing = list(
        dict.fromkeys(
            ".".join([*(str(p) for p in e.absolute_path), name])
            for e in errors
            if e.validator == "required" and isinstance(e.instance, dict)
            for name in e.validator_value
            if name not in e.instance
        )
    )
    if missing:
        review.flag(
            "record_incomplete",
            "required fields missing from the record: " + ", ".join(missing[:10]),
            element="record",
        )
    review.draft["record_valid"] = not errors


TASK = TaskSpec(
    id="EXT-EHR",
    slug="ehr-fields",
    title="EHR field extraction",
    version="1.0.0",
    mode="extract",
    system_prompt=SYSTEM_PROMPT,
    input_model=EhrFieldsInput,
    output_model=EhrFieldsDraft,
    instruction=_instruction,
    checks=(check_fields,),
    max_tokens=2048,
    latency_target_ms=None,
    sources_skip=("field_schema",),
    number_exempt=("sources", "quote", "name"),
    description=(
        "EHR text + the caller's JSON Schema -> the caller's object (record), assembled in "
        "code from cited {name, value} entries: unknown names dropped, each value verified, "
        "converted and checked against its field's schema, the record validated against "
        "the whole schema, missing required fields reported as gaps."
    ),
)
