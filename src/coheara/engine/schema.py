"""JSON Schemas for structured extraction: bounded before sending, validated after.

The model is known to loop when writing JSON, so every string and array the
engine sends carries a bound; a caller's own bound is kept when it is tighter.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import jsonschema
from pydantic import BaseModel, ValidationError

from coheara.errors import InvalidRequestError

DEFAULT_MAX_LENGTH = 2000
DEFAULT_MAX_ITEMS = 64
DEFAULT_MAX_PROPERTIES = 64
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMA_SINGLE = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


def _types(node: dict[str, Any]) -> set[str]:
    kind = node.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list):
        return {k for k in kind if isinstance(k, str)}
    return set()


def _bound(node: Any, max_length: int, max_items: int) -> None:
    if not isinstance(node, dict):
        return
    kinds = _types(node)
    # A pattern bounds its own length (and xgrammar ignores maxLength beside one).
    if "string" in kinds and not {"enum", "const", "pattern"} & node.keys():
        node["maxLength"] = min(int(node.get("maxLength", max_length)), max_length)
    if "array" in kinds:
        node["maxItems"] = min(int(node.get("maxItems", max_items)), max_items)
    if "object" in kinds and node.get("additionalProperties") is not False:
        # An open object ("json" mode) could otherwise grow key after key until max_tokens.
        declared = len(node.get("properties") or {})
        limit = max(DEFAULT_MAX_PROPERTIES, declared)
        node["maxProperties"] = min(int(node.get("maxProperties", limit)), limit)
    for key in _SUBSCHEMA_LISTS:
        for child in node.get(key, []) or []:
            _bound(child, max_length, max_items)
    for key in _SUBSCHEMA_MAPS:
        for child in (node.get(key) or {}).values():
            _bound(child, max_length, max_items)
    for key in _SUBSCHEMA_SINGLE:
        _bound(node.get(key), max_length, max_items)


@dataclass(frozen=True)
class Problem:
    """A validation failure. `message` may quote the output: only the model sees it."""

    path: str
    keyword: str
    message: str

    def redacted(self) -> str:
        """Safe for logs, errors and warnings: where and which rule, never the value."""
        return f"{self.path}: {self.keyword}"


@dataclass(frozen=True)
class OutputSchema:
    """The schema sent to the model and the means to validate against it."""

    schema: dict[str, Any]
    model: type[BaseModel] | None = None

    @classmethod
    def build(
        cls,
        source: dict[str, Any] | type[BaseModel],
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        max_items: int = DEFAULT_MAX_ITEMS,
    ) -> OutputSchema:
        model: type[BaseModel] | None = None
        if isinstance(source, type) and issubclass(source, BaseModel):
            model = source
            raw = source.model_json_schema()
        elif isinstance(source, dict):
            raw = copy.deepcopy(source)
        else:
            raise InvalidRequestError("schema must be a JSON Schema object or a Pydantic model")
        try:
            jsonschema.Draft202012Validator.check_schema(raw)
        except jsonschema.SchemaError as exc:
            raise InvalidRequestError(f"invalid JSON Schema: {exc.message}") from None
        _check_refs(raw, raw)
        if raw.get("type") not in ("object", "array") and not any(
            k in raw for k in ("properties", "anyOf", "oneOf", "$ref")
        ):
            raise InvalidRequestError("schema must describe a JSON object or array")
        _bound(raw, max_length, max_items)
        return cls(raw, model)

    def validate(self, text: str) -> tuple[Any, list[Problem]]:
        """Parse and check `text`; return the value and the problems (empty when valid)."""
        try:
            data = json.loads(_strip_fences(text))
        except json.JSONDecodeError as exc:
            return None, [Problem("(root)", "json", f"not valid JSON: {exc.msg} at {exc.pos}")]
        validator = jsonschema.Draft202012Validator(self.schema)
        errors = sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.path])
        problems: list[Problem] = []
        for error in errors[:10]:
            if error.validator == "required" and isinstance(error.instance, dict):
                # Name the missing field (schema text, not patient data) in the path.
                problems.extend(
                    Problem(_path([*error.absolute_path, name]), "required", error.message)
                    for name in error.validator_value
                    if name not in error.instance
                )
            else:
                problems.append(
                    Problem(_path(error.absolute_path), str(error.validator), error.message)
                )
        if problems:
            return data, problems
        if self.model is not None:
            try:
                return self.model.model_validate(data), []
            except ValidationError as exc:
                return data, [
                    Problem(_path(e["loc"]), e["type"], e["msg"]) for e in exc.errors()[:10]
                ]
        return data, []


def _check_refs(node: Any, root: dict[str, Any]) -> None:
    """Every `$ref` must point inside the schema: nothing is fetched, nothing left dangling."""
    if isinstance(node, list):
        for item in node:
            _check_refs(item, root)
        return
    if not isinstance(node, dict):
        return
    ref = node.get("$ref")
    if ref is not None:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise InvalidRequestError(f"schema $ref {ref!r} is not local: only '#/...' refs")
        target: Any = root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise InvalidRequestError(f"schema $ref {ref!r} points nowhere")
            target = target[part]
    for key, value in node.items():
        if key not in ("enum", "const", "default", "examples"):
            _check_refs(value, root)


def _path(parts: Any) -> str:
    return "/".join(map(str, parts)) or "(root)"


def _strip_fences(text: str) -> str:
    """Models that ignore the constraint often wrap JSON in a Markdown fence."""
    body = text.strip()
    if body.startswith("```"):
        body = body.split("\n", 1)[1] if "\n" in body else ""
        if body.rstrip().endswith("```"):
            body = body.rstrip()[:-3]
    return body.strip()
