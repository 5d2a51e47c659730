"""What the imaging reads (IMG-*) share: the draft's shape, how images are prepared, the
checks, the system prompt's rules and the FHIR form. Each read is one module that
declares its own `TASK`; this module declares none.

Image findings are drafts with the image as their only basis: the image is not a SOURCES
item, so a finding cannot cite one. They are therefore not `Cited` elements: each
`ImageFinding` says `basis: "image"` and is not traced (the section's confidence is
"unknown": the layer cannot verify what the model saw). The clinical history given in
the input is numbered like any task input, and the model cites it in
`relevant_history` (`Statement`s, traced and number-checked as usual). Numbers in
image-derived text (a size, a count) cannot be checked against the input: one the
input does not hold is flagged as a warning (`image_number_unverified`; the model sees a
896x896 resize with no pixel spacing, so a measurement is at best an estimate), except
image, slice and patch labels and ordinals (`SLICE 12`, `5th rib`).

Provenance: the runner puts each image's provenance (what was done to it: recipe,
window, slice order, tile position, warnings; never identifying data) into the
response's `metadata.images`. It is not copied into the draft: the draft is the model's
content checked against its schema, and the checks do not see the prepared images.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from coheara.errors import ImageError
from coheara.tasks import fhir
from coheara.tasks.sources import numbers_in
from coheara.tasks.spec import POINT_OF_CARE_MS, Check, Review, Statement, TaskSpec, is_gap_marker

if TYPE_CHECKING:
    from coheara.imaging.limits import ImageLimits
    from coheara.imaging.prepare import Prepared
    from coheara.tasks.envelope import ArtifactContext, TaskRequest

IMAGE_FIELDS = ("observation", "location", "impression", "limitations")
"""Draft keys whose text comes from the image: exempt from the shared number check (an
input number is not expected there), checked by `check_image_numbers` instead."""

NUMBER_EXEMPT = ("sources", "quote", "code", "rank", "confidence", *IMAGE_FIELDS)

Quality = Literal["adequate", "limited", "non-diagnostic"]


# ----- the draft -------------------------------------------------------------------------


class ImageFinding(BaseModel):
    """One observation seen on the image(s). Its basis is the image: it cites no source."""

    basis: Literal["image"] = Field(
        "image", description="Always 'image': seen on the image, not taken from the text."
    )
    observation: str = Field(
        max_length=300, description="What is seen, in standard terminology; normal included."
    )
    location: str = Field(
        "",
        max_length=80,
        description="Where: anatomical site, and the image, SLICE or PATCH label if several.",
    )


class ImagingRead(BaseModel):
    """A preliminary read: image findings, an impression, limits, and the history used."""

    image_quality: Quality = Field(description="Whether the images allow a read.")
    findings: list[ImageFinding] = Field(
        default_factory=list, max_length=10, description="Observations seen on the images."
    )
    impression: str = Field(
        max_length=600,
        description="The most important findings, most important first; no treatment advice.",
    )
    limitations: str = Field(
        "", max_length=300, description="What limits this read (view, quality, coverage)."
    )
    relevant_history: list[Statement] = Field(
        default_factory=list,
        max_length=4,
        description="Clinical history items from SOURCES that bear on the read, cited.",
    )


# ----- the system prompt -----------------------------------------------------------------

RULES = """\
Your read is a PRELIMINARY DRAFT for a qualified clinician, who reviews and corrects it \
before any use. It is not a diagnosis and must not be acted on without that review.

Rules:
- Describe only what is visible on the images given. State pertinent normal findings.
- Give every finding its location. Use standard terminology.
- The images were resized to 896x896 without pixel spacing: do not give measurements in \
millimetres or centimetres; describe size in words (small, large) unless the clinical \
text states a size.
- Do not invent clinical history, prior studies or comparisons, patient details or \
technique details that you were not given.
- Do not recommend treatment or management, and do not give a prognosis.
- If the images do not allow a read (quality, coverage, wrong body part), say so in \
image_quality and limitations rather than guessing.
- English only."""


def system_prompt(role: str) -> str:
    """A read's system prompt: its role sentence, then the shared rules."""
    return f"{role}\n\n{RULES}"


def history_note() -> str:
    """The part of every instruction about the text: findings cite nothing, history does."""
    return (
        "findings come from the images: give each its observation and location; they cite "
        "no sources. relevant_history lists the clinical history items in SOURCES that bear "
        "on the read; the citation rules below apply to relevant_history only. If SOURCES "
        "has none, leave relevant_history empty."
    )


def lines(*parts: str) -> str:
    """A read's instruction: its parts one a line, less those with nothing to say (the
    input's context lines may be empty)."""
    return "\n".join(part for part in parts if part)


def context_lines(data: BaseModel, labels: dict[str, str]) -> str:
    """The input's own fields named in the instruction (their text is in SOURCES too)."""
    lines = []
    values = data.model_dump(exclude_none=True)
    for key, label in labels.items():
        value = values.get(key)
        if value not in (None, "", []):
            lines.append(f"{label}: {value}")
    return "\n".join(lines)


# ----- images ----------------------------------------------------------------------------


def single_images(
    task_id: str, most: int, what: str
) -> Callable[[list[Any], ImageLimits], Prepared]:
    """Each input is one image (a picture or a single-frame DICOM), up to `most`: a chest
    film with its lateral view, a lesion close-up and its dermoscopy, both eyes."""

    def prepare_images(items: list[Any], image_limits: ImageLimits) -> Prepared:
        from coheara.imaging.prepare import Prepared, prepare

        if len(items) > most:
            raise ImageError(
                f"{task_id} reads at most {most} image(s) ({what}); {len(items)} were given"
            )
        images = []
        notes: list[str] = []
        for number, item in enumerate(items, start=1):
            one = prepare(item, image_limits=image_limits)
            if len(one.images) != 1:
                raise ImageError(
                    f"{task_id}: image {number} gives {len(one.images)} images; each input "
                    "must be one picture or one single-frame DICOM",
                    hint="for a CT or MR series use IMG-VOLUME",
                )
            images.append(replace(one.images[0], source=f"image {number}"))
            notes += [f"image {number}: {note}" for note in one.warnings]
        return Prepared(
            tuple(images), kind="image" if len(images) == 1 else "images", warnings=tuple(notes)
        )

    return prepare_images


def prepare_volume(items: list[Any], image_limits: ImageLimits) -> Prepared:
    """One CT or MR series (two or more DICOM files, or a folder) into an ordered volume."""
    from coheara.imaging.prepare import prepare

    prepared = prepare(items if len(items) > 1 else items[0], image_limits=image_limits)
    if prepared.kind != "volume":
        raise ImageError(
            "IMG-VOLUME reads one CT or MR series: give its DICOM files (two or more) or its "
            f"folder, not {prepared.kind} input",
            hint="for a single picture use IMG-CXR, IMG-DERM, IMG-FUNDUS or IMG-PATH",
        )
    return prepared


def prepare_current_prior(items: list[Any], image_limits: ImageLimits) -> Prepared:
    """The first image is the current study, the second the prior (sent prior first)."""
    from coheara.imaging.prepare import prepare_pair

    if len(items) != 2:
        raise ImageError(
            f"IMG-CXR-PRIOR compares two chest X-rays; {len(items)} image(s) were given",
            hint="give the current study first, then the prior",
        )
    return prepare_pair(items[0], items[1], image_limits=image_limits)


def prepare_patches(items: list[Any], image_limits: ImageLimits) -> Prepared:
    """Pathology: a picture larger than one model patch (896 px a side) is cut into tissue
    tiles (`prepare(tiles=True)`: background skipped, spatial order); a smaller one is an
    already cut patch and goes whole. At most `DEFAULT_MAX_TILES` patches in all. Each
    reaches the model followed by its `PATCH n` label (`Prepared` of kind "tiles")."""
    from coheara.imaging import limits
    from coheara.imaging.image import PreparedImage
    from coheara.imaging.prepare import Prepared, prepare
    from coheara.imaging.tiles import DEFAULT_MAX_TILES, TILE_SIZE

    images: list[PreparedImage] = []
    notes: list[str] = []
    tilesets: list[Any] = []
    with limits.applied(image_limits):
        for number, item in enumerate(items, start=1):
            left = DEFAULT_MAX_TILES - len(images)
            if left < 1:
                raise ImageError(f"IMG-PATH takes at most {DEFAULT_MAX_TILES} patches in all")
            (width, height), source = _picture_size(item, number)
            if max(width, height) > TILE_SIZE:
                tiled = prepare(source, tiles=True, max_tiles=left)
                images += tiled.images
                tilesets.append(tiled.tileset)
                notes += [f"image {number}: {note}" for note in tiled.warnings]
            else:
                one = prepare(source)
                if len(one.images) != 1:
                    raise ImageError(f"IMG-PATH: image {number} is not one picture")
                images.append(replace(one.images[0], source=f"patch {len(images) + 1}"))
                notes += [f"image {number}: {note}" for note in one.warnings]
        limits.check_image_count(len(images))
    return Prepared(
        tuple(images),
        kind="tiles",
        warnings=tuple(notes),
        tileset=tilesets[0] if len(items) == 1 and tilesets else None,
    )


def _picture_size(item: Any, number: int) -> tuple[tuple[int, int], Any]:
    """(width, height) from the header only, before anything is decoded, and the input
    to read the pixels from (the bytes, once read)."""
    import numpy as np
    from PIL import Image

    from coheara.imaging.dicom import looks_like_dicom
    from coheara.imaging.image import open_picture, source_bytes

    if isinstance(item, np.ndarray):
        return (int(item.shape[1]), int(item.shape[0])), item
    if isinstance(item, Image.Image):
        return item.size, item
    data = source_bytes(item, f"image {number}")
    if looks_like_dicom(data[:132]):
        raise ImageError("IMG-PATH reads pictures (PNG, JPEG, TIFF), not DICOM")
    with open_picture(data) as picture:
        return picture.size, data


# ----- checks ----------------------------------------------------------------------------

_LABEL = re.compile(
    r"\b(?:slices?|patch(?:es)?|images?|views?|rows?|columns?|cols?|zones?|segments?)"
    r"\s*#?\s*\d+(?:\s*(?:-|to|and|,)\s*\d+)*\b|\b\d+(?:st|nd|rd|th)\b",
    re.IGNORECASE,
)
"""Image, slice and patch labels and ordinals: references, not measurements."""


def _image_texts(draft: dict[str, Any]) -> list[tuple[str, str]]:
    """(path, text) of every image-derived string of the draft."""
    out: list[tuple[str, str]] = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                where = f"{path}.{key}" if path else key
                if key in IMAGE_FIELDS and isinstance(inner, str):
                    out.append((where, inner))
                else:
                    walk(inner, where)
        elif isinstance(value, list):
            for index, inner in enumerate(value):
                walk(inner, f"{path}[{index}]")

    walk(draft, "")
    return out


def check_image_numbers(review: Review) -> None:
    """A number in image-derived text that the input does not hold cannot be verified."""
    known = review.sources.numbers()
    for path, text in _image_texts(review.draft):
        if is_gap_marker(text):
            continue
        unverified = sorted(numbers_in(_LABEL.sub(" ", text)) - known)
        if unverified:
            review.flag(
                "image_number_unverified",
                f"{', '.join(unverified[:5])} is not in the input: a number read from the "
                "image (no pixel spacing reaches the model) cannot be verified; check it on "
                "the image",
                element=path,
                severity="warning",
            )


def check_findings_present(review: Review) -> None:
    """A read states its findings: none, or an empty impression, is a missing section."""
    findings = [
        f
        for f in review.draft.get("findings") or []
        if isinstance(f, dict) and str(f.get("observation") or "").strip()
    ]
    if not findings:
        review.flag("no_image_findings", "the read states no image finding", element="findings")
        review.gap("missing_section", "no image finding was stated", element="findings")
    if not str(review.draft.get("impression") or "").strip():
        review.flag("no_impression", "the read has no impression", element="impression")
        review.gap("missing_section", "no impression was stated", element="impression")


_COMPARISON = re.compile(
    r"\b(?:unchanged|interval(?:ly)?\s+\w+|compared\s+(?:with|to)|comparison\s+with|"
    r"since\s+the\s+(?:prior|previous|last)|(?:prior|previous|earlier|old)\s+"
    r"(?:study|studies|film|films|exam|examination|radiograph|image|images|scan|ct|mri|"
    r"photo|photograph|biopsy)|new\s+since|no\s+longer\s+seen|has\s+(?:increased|decreased|"
    r"resolved|progressed|improved|worsened))\b",
    re.IGNORECASE,
)
_PRIOR_IN_INPUT = re.compile(
    r"\b(?:(?:prior|previous|earlier|old|last)\s+(?:study|studies|film|films|x-?ray|cxr|ct|"
    r"mri|scan|exam|examination|imaging|radiograph|photo|photograph|biopsy)|compar\w*)\b",
    re.IGNORECASE,
)
"""The input names an earlier study: a comparison may rest on it."""


def check_no_invented_comparison(review: Review) -> None:
    """A single-study read has nothing to compare with, unless the history names a prior
    study: a comparison there is invented."""
    if any(_PRIOR_IN_INPUT.search(item.text) for item in review.sources.items):
        return
    for path, text in _image_texts(review.draft):
        if _COMPARISON.search(text):
            review.flag(
                "comparison_without_prior",
                "compares with a prior study, but no prior study or history of one was given",
                element=path,
                severity="error",
            )


SINGLE_STUDY_CHECKS = (check_image_numbers, check_findings_present, check_no_invented_comparison)


# ----- FHIR ------------------------------------------------------------------------------

_V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"


def fhir_builder(
    task_id: str, title: str, category: tuple[str, str] | None
) -> Callable[[BaseModel, TaskRequest], dict[str, Any]]:
    """A preliminary DiagnosticReport: the impression as its conclusion, each image
    finding as a note marked image-derived, the history used as notes with their ids."""

    def to_fhir(draft: Any, request: TaskRequest) -> dict[str, Any]:
        from fhir.resources.diagnosticreport import DiagnosticReport

        notes = [
            {
                "text": f"Image finding (draft): {f.observation}"
                + (f" [{f.location}]" if f.location else "")
            }
            for f in draft.findings
        ]
        notes += [
            {"text": f"Clinical history used ({', '.join(h.sources) or 'uncited'}): {h.text}"}
            for h in draft.relevant_history
        ]
        notes += _extra_notes(draft)
        if draft.limitations:
            notes.append({"text": f"Limitations: {draft.limitations}"})
        body: dict[str, Any] = {
            "status": "preliminary",
            "identifier": [fhir.request_identifier(request)],
            "code": {"text": f"{title} (draft by {task_id})"},
            "subject": fhir.patient(request),
            "encounter": fhir.encounter(request),
            "conclusion": draft.impression or None,
            "note": notes or None,
        }
        if category is not None:
            body["category"] = [
                {"coding": [{"system": _V2_0074, "code": category[0], "display": category[1]}]}
            ]
        resource = DiagnosticReport.model_validate({k: v for k, v in body.items() if v})
        return resource.model_dump(mode="json", exclude_none=True)

    return to_fhir


def _extra_notes(draft: Any) -> list[dict[str, str]]:
    changes: Sequence[Any] = getattr(draft, "changes", None) or ()
    return [
        {
            "text": f"Change since prior (draft): {c.status}: {c.observation}"
            + (f" [{c.location}]" if c.location else "")
        }
        for c in changes
    ]


RADIOLOGY = ("RAD", "Radiology")


def imaging_task(
    *,
    task_id: str,
    slug: str,
    title: str,
    role: str,
    input_model: type[BaseModel],
    instruction: Callable[[Any, ArtifactContext | None], str],
    prepare_images: Callable[[list[Any], ImageLimits], Prepared],
    description: str,
    category: tuple[str, str] | None = RADIOLOGY,
    output_model: type[BaseModel] = ImagingRead,
    checks: tuple[Check, ...] = SINGLE_STUDY_CHECKS,
    latency_target_ms: int | None = POINT_OF_CARE_MS,
    version: str = "1.0.0",
) -> TaskSpec:
    """An image read's spec: what every read shares (mode, rules, number exemptions, the
    DiagnosticReport form) filled in, what differs passed in."""
    return TaskSpec(
        id=task_id,
        slug=slug,
        title=title,
        version=version,
        mode="image",
        system_prompt=system_prompt(role),
        input_model=input_model,
        output_model=output_model,
        instruction=instruction,
        checks=checks,
        max_tokens=1024,
        latency_target_ms=latency_target_ms,
        number_exempt=NUMBER_EXEMPT,
        to_fhir=fhir_builder(task_id, title, category),
        prepare_images=prepare_images,
        description=description,
    )
