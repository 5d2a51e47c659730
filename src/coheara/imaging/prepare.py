"""One entry point for every image input: a file, bytes, a folder or a list of files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from coheara.errors import ImageError
from coheara.imaging import limits
from coheara.imaging.image import PreparedImage, load_image, load_pages
from coheara.imaging.limits import ImageLimits

_RECIPE_FOR_MODALITY = {"CT": "ct_windows", "MR": "min_max"}


@dataclass(frozen=True, eq=False)
class Prepared:
    """Model-ready images in order (each 896x896x3 uint8), what was done, and warnings."""

    images: tuple[PreparedImage, ...]
    kind: str
    """"image" (one picture), "dicom" (one file, its frames), "images" (several pictures)
    or "volume" (one CT or MR series)."""
    warnings: tuple[str, ...] = ()
    volume: Any = None
    """The `Volume` when kind is "volume" (slice order, sampling, value range)."""
    tileset: Any = None
    """The `TileSet` when kind is "tiles" (grid, boxes, background skipped)."""
    details: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Non-identifying: the kind, each image's provenance, the volume's order and sampling."""
        out: dict[str, Any] = {"kind": self.kind, "images": len(self.images)}
        for group in (self.volume, self.tileset):
            if group is not None:
                out.update(group.summary())
        out["warnings"] = list(self.warnings)
        out["provenance"] = [
            image.provenance.to_dict() if image.provenance else None for image in self.images
        ]
        return out

    def labels(self) -> list[str]:
        """What names each image in the prompt: `SLICE n`, PRIOR / CURRENT, else `image n`."""
        if self.kind == "volume":
            return [f"SLICE {n}" for n in range(1, len(self.images) + 1)]
        if self.kind == "pair":
            return ["PRIOR", "CURRENT"]
        if self.kind == "tiles":
            from coheara.imaging.tiles import tile_parts

            return [p for p in tile_parts("", self.images, "")[2::2] if isinstance(p, str)]
        return [f"image {n}" for n in range(1, len(self.images) + 1)]

    def header_text(self, fields: Sequence[str]) -> str:
        """The named non-identifying header codes of each image, in words, for a prompt:
        only `HEADER_FIELDS` (modality, body part, view position) and only codes."""
        unknown = [f for f in fields if f not in HEADER_FIELDS]
        if unknown:
            raise ImageError(
                f"unknown header field '{str(unknown[0])[:32]}'",
                hint="one of " + ", ".join(HEADER_FIELDS),
            )
        described: list[str] = []
        for label, image in zip(self.labels(), self.images, strict=True):
            where = image.provenance
            words = [
                f"{HEADER_FIELDS[f]} {getattr(where, f)}"
                for f in fields
                if where is not None and getattr(where, f, None)
            ]
            if words:
                described.append(f"{label}: " + ", ".join(words))
        if self.kind == "volume" and described:  # one series: say it once
            described = [described[0].replace("SLICE 1: ", "series: ", 1)]
        return ("Image details: " + "; ".join(described) + ".") if described else ""

    def messages(
        self,
        question: str,
        *,
        instruction: str | None = None,
        header_fields: Sequence[str] = (),
    ) -> list[Any]:
        """The engine's `messages=` for these images: a volume gets its slice labels, a
        pair its PRIOR and CURRENT labels, in one user turn of ordered parts.

        header_fields: DICOM codes the caller chooses to show the model (`HEADER_FIELDS`);
        by default no metadata reaches the prompt, only pixels."""
        details = self.header_text(header_fields) if header_fields else ""
        if details:
            question = f"{details}\n{question}"
        from coheara.engine.chat_format import InputMessage
        from coheara.imaging.volume import default_instruction, volume_messages

        if self.kind == "volume":
            instruction = instruction or default_instruction(self.volume)
            return volume_messages(question, self.images, instruction=instruction)
        if self.kind == "tiles":
            from coheara.imaging.tiles import tile_messages

            return tile_messages(question, self.images, instruction=instruction)
        if self.kind == "pair":
            prior, current = self.images
            parts: list[str | PreparedImage] = [instruction or PAIR_INSTRUCTION]
            parts += ["PRIOR:", prior, "CURRENT:", current, question]
            return [InputMessage.from_parts("user", parts)]
        out = [InputMessage("system", instruction)] if instruction else []
        out.append(InputMessage("user", question, self.images))
        return out


def _is_dicom_ref(item: Any) -> bool:
    from coheara.imaging.dicom import looks_like_dicom

    if isinstance(item, bytes | bytearray | memoryview):
        return looks_like_dicom(bytes(item[:132]))
    if isinstance(item, str | Path):
        path = Path(item)
        try:
            if not path.is_file():
                return False
            with path.open("rb") as handle:
                return looks_like_dicom(handle.read(132))
        except (OSError, ValueError):
            return False
    return False


def _is_folder(item: Any) -> bool:
    if not isinstance(item, str | Path):
        return False
    try:
        return len(str(item)) < 4096 and Path(item).is_dir()
    except (OSError, ValueError):
        return False


def is_series(items: Sequence[Any]) -> bool:
    """Whether these inputs make one volume: a single folder, or two or more DICOM files."""
    items = list(items)
    if len(items) == 1:
        return _is_folder(items[0])
    return len(items) > 1 and all(_is_dicom_ref(item) for item in items)


HEADER_FIELDS: dict[str, str] = {
    "modality": "modality",
    "body_part": "body part",
    "view_position": "view",
}
"""The only header fields a caller may put in a prompt: non-identifying codes."""

PAIR_INSTRUCTION = (
    "You are given two chest X-rays of the same patient in time order: first the PRIOR "
    "study, then the CURRENT study."
)
"""Says the order in words too, so a runtime that cannot interleave labels (Ollama) still
tells the model which image is which."""


def prepare_pair(
    current: Any,
    prior: Any,
    *,
    preset: str | None = None,
    window: tuple[float, float] | None = None,
    image_limits: ImageLimits | None = None,
) -> Prepared:
    """A current and a prior study (one image each: a picture or a single-frame DICOM) for
    the longitudinal comparison MedGemma 1.5 supports; sent prior first, each labelled."""
    with limits.applied(image_limits):
        images = []
        notes: list[str] = []
        for role, source in (("prior", prior), ("current", current)):
            one = prepare(source, preset=preset, window=window)
            if len(one.images) != 1:
                raise ImageError(
                    f"the {role} study gives {len(one.images)} images; a pair takes one each",
                    hint="pass one radiograph per study",
                )
            images.append(replace(one.images[0], source=role))
            notes += [f"{role}: {note}" for note in one.warnings]
        return Prepared(tuple(images), kind="pair", warnings=tuple(notes))


def prepare(
    source: Any,
    *,
    modality: str | None = None,
    preset: str | None = None,
    window: tuple[float, float] | None = None,
    max_slices: int = 85,
    tiles: bool = False,
    region: tuple[int, int, int, int] | None = None,
    max_tiles: int = 126,
    image_limits: ImageLimits | None = None,
) -> Prepared:
    """A file path, bytes, an array or PIL image, a folder, or a list of paths into images.

    - a picture (PNG, JPEG, ...) goes through `load_image`;
    - one DICOM file through `load_dicom` (every frame);
    - a folder, or a list of two or more DICOM files or byte strings, is one CT or MR
      series: ordered along the slice normal, sampled to `max_slices`, CT windowed and MR
      scaled by one min-max over the volume (`coheara.imaging.volume.load_volume`);
    - a list of pictures gives one image each, in order.

    modality: "CT" or "MR" forces that recipe on DICOM; preset (a CT preset name) or
    window ((center, width)) replaces the recipe; neither applies to pictures.
    tiles: a large picture (a pathology slide export) cut into non-overlapping 896x896
    tissue patches in spatial order, at most `max_tiles`, background skipped; `region`
    (x, y, width, height) tiles part of it (`coheara.imaging.tiles.tile_image`).
    image_limits: the site's limits (`Settings.image_limits()`), else those in force.
    """
    with limits.applied(image_limits):
        if tiles or region is not None:
            prepared = _tiles(source, region, max_tiles, modality, preset, window)
        else:
            prepared = _prepare(source, modality, preset, window, max_slices)
        limits.check_image_count(len(prepared.images))
        return prepared


def _prepare(
    source: Any,
    modality: str | None,
    preset: str | None,
    window: tuple[float, float] | None,
    max_slices: int,
) -> Prepared:
    if modality is not None:
        modality = modality.strip().upper()
        if modality not in _RECIPE_FOR_MODALITY:
            raise ImageError(f"unknown modality '{modality[:16]}'", hint="one of CT, MR")
    if isinstance(source, str | Path) and _is_folder(source):
        return _volume(source, modality, preset, window, max_slices)
    if isinstance(source, Sequence) and not isinstance(source, str | bytes | bytearray):
        items = list(source)
        if not items:
            raise ImageError("no image given")
        if any(_is_folder(item) for item in items):
            if len(items) == 1:
                return _volume(items[0], modality, preset, window, max_slices)
            raise ImageError("give one folder, or files, not several folders")
        if len(items) == 1:
            return _prepare(items[0], modality, preset, window, max_slices)
        dicom = [_is_dicom_ref(item) for item in items]
        if all(dicom):
            return _volume(items, modality, preset, window, max_slices)
        if any(dicom):
            raise ImageError(
                "DICOM files and pictures are mixed",
                hint="give the DICOM files of one series, or pictures only",
            )
        _no_dicom_options(modality, preset, window)
        images = tuple(
            load_image(_picture(item), label=f"image {i + 1}") for i, item in enumerate(items)
        )
        return Prepared(images, kind="images")
    if _is_dicom_ref(source):
        from coheara.imaging.dicom import load_dicom
        from coheara.imaging.volume import is_multiframe_volume

        if is_multiframe_volume(source):  # an Enhanced CT or MR: its frames are slices
            return _volume(source, modality, preset, window, max_slices)

        frames = load_dicom(
            Path(source) if isinstance(source, str) else source,
            recipe=_RECIPE_FOR_MODALITY.get(modality or "")
            if preset is None and window is None
            else None,
            preset=preset,
            window=window,
        )
        notes: list[str] = []
        for frame in frames:
            for note in frame.provenance.warnings if frame.provenance else ():
                if note not in notes:
                    notes.append(note)
        return Prepared(tuple(frames), kind="dicom", warnings=tuple(notes))
    _no_dicom_options(modality, preset, window)
    pages = tuple(load_pages(_picture(source)))  # a multi-page TIFF gives every page
    return Prepared(pages, kind="image" if len(pages) == 1 else "images")


def _tiles(
    source: Any,
    region: tuple[int, int, int, int] | None,
    max_tiles: int,
    modality: str | None,
    preset: str | None,
    window: tuple[float, float] | None,
) -> Prepared:
    from coheara.imaging.tiles import tile_image

    _no_dicom_options(modality, preset, window)
    if _is_dicom_ref(source) or not isinstance(
        source, str | Path | bytes | bytearray | memoryview | np.ndarray | Image.Image
    ):
        raise ImageError("tiling takes one large picture (a slide exported to TIFF or PNG)")
    tileset = tile_image(
        bytes(source) if isinstance(source, bytearray | memoryview) else source,
        region=region,
        max_tiles=max_tiles,
    )
    return Prepared(tileset.tiles, kind="tiles", warnings=tileset.warnings, tileset=tileset)


def _picture(item: Any) -> Any:
    if isinstance(item, str | Path | bytes | bytearray | memoryview | np.ndarray | Image.Image):
        return item if not isinstance(item, bytearray | memoryview) else bytes(item)
    if isinstance(item, PreparedImage):
        return item
    raise ImageError(f"unsupported image input type {type(item).__name__}")


def _no_dicom_options(
    modality: str | None, preset: str | None, window: tuple[float, float] | None
) -> None:
    if preset is not None or window is not None or modality is not None:
        raise ImageError("modality, preset and window apply to DICOM input only")


def _volume(
    source: Any,
    modality: str | None,
    preset: str | None,
    window: tuple[float, float] | None,
    max_slices: int,
) -> Prepared:
    from coheara.imaging.volume import load_volume

    volume = load_volume(
        source, modality=modality, preset=preset, window=window, max_slices=max_slices
    )
    return Prepared(
        _carry_warnings(volume.slices, volume.warnings),
        kind="volume",
        warnings=volume.warnings,
        volume=volume,
    )


def _carry_warnings(
    images: tuple[PreparedImage, ...], notes: tuple[str, ...]
) -> tuple[PreparedImage, ...]:
    """Put the set's own warnings (order, sampling) on the first image's provenance too, so
    they reach every result through the engine, whichever surface sent the images."""
    first = images[0].provenance
    if first is None:
        return images
    missing = tuple(n for n in notes if n not in first.warnings)
    if not missing:
        return images
    provenance = replace(first, warnings=first.warnings + missing)
    return (replace(images[0], provenance=provenance), *images[1:])
