"""`coheara image inspect`: draw what the model will see, so a person can check it by eye.

Every input goes through `coheara.imaging.prepare`, the one entry point the other commands
use, so the sheet shows the very pixels a request would carry. What is printed comes from
`Prepared.summary()`, which is non-identifying by design: no file names, no DICOM fields.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from coheara.cli.common import err_console, parse_window, write
from coheara.errors import InvalidRequestError
from coheara.imaging.prepare import prepare, prepare_pair
from coheara.settings import load_settings

image_app = typer.Typer(help="Check images as the model will see them.", no_args_is_help=True)

_MOST_SHOWN = 3
"""Distinct values listed in one row before the rest are only counted."""


def check_out(out: Path, inputs: list[Path]) -> None:
    """Refuse before any work: a PNG name, in a folder that exists, not one of the inputs.

    The path is not echoed: a folder or file name may carry a patient's name.
    """
    if out.suffix.lower() != ".png":
        raise InvalidRequestError("--out must name a .png file")
    if out.is_dir():
        raise InvalidRequestError("--out is a folder; name a .png file")
    if not out.parent.is_dir():
        raise InvalidRequestError("the folder of --out does not exist", hint="create it first")
    target = out.resolve()
    if any(target == path.resolve() for path in inputs):
        raise InvalidRequestError("--out is one of the inputs; name another file")


def _write_png(image: Any, out: Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    try:
        out.write_bytes(buffer.getvalue())
    except OSError as exc:
        raise InvalidRequestError(f"cannot write --out: {exc.strerror}") from None


def _number(value: Any) -> str:
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)[:40]


def window_text(provenance: dict[str, Any] | None) -> str:
    """One image's window in words, read by its recipe (the tuple means something else
    under each recipe)."""
    if provenance is None:
        return "none (a picture, resized)"
    recipe, preset = provenance.get("recipe"), provenance.get("preset")
    window: Any = provenance.get("window")
    try:
        if recipe == "ct_windows":
            return (
                ", ".join(
                    f"{name} {_number(lo)}..{_number(hi)}"
                    for name, (lo, hi) in zip("RGB", window, strict=True)
                )
                + " HU"
            )
        if recipe == "preset":
            center, width = window
            return f"{preset or 'custom'}: center {_number(center)}, width {_number(width)}"
        if recipe == "file_window":
            if window == "voi_lut":
                return "the file's VOI LUT"
            center, width = window
            function = provenance.get("voi_function") or "LINEAR"
            return f"the file's: center {_number(center)}, width {_number(width)} ({function})"
        if recipe in ("min_max", "full_range"):
            lo, hi = window
            return f"range {_number(lo)}..{_number(hi)}"
        if recipe == "color":
            return "none (colour kept)"
        if recipe in ("square_resize", "tile", "tile_resize"):
            return "none (a picture, resized)" if recipe == "square_resize" else "none (a tile)"
    except (TypeError, ValueError):
        pass
    return "-" if window is None else str(window)[:60]


def _distinct(values: list[str]) -> str:
    unique = list(dict.fromkeys(values))
    if len(unique) <= _MOST_SHOWN:
        return "; ".join(unique)
    return "; ".join(unique[:_MOST_SHOWN]) + f"; ... ({len(unique)} different)"


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The table's rows, from the non-identifying summary only."""
    provenance: list[dict[str, Any] | None] = list(summary.get("provenance") or [])
    rows: list[tuple[str, str]] = [("kind", str(summary.get("kind")))]
    if summary.get("kind") == "volume":
        rows.append(
            (
                "images",
                f"{summary.get('slices')} slices of {summary.get('series_slices')} in the series",
            )
        )
        rows.append(("modality", str(summary.get("modality") or "unknown")))
    else:
        rows.append(("images", str(summary.get("images"))))
        modalities = [str(p.get("modality")) for p in provenance if p and p.get("modality")]
        if modalities:
            rows.append(("modality", _distinct(modalities)))
    recipes = [str(p.get("recipe")) if p else "picture" for p in provenance]
    rows.append(("recipe", str(summary.get("recipe") or _distinct(recipes) or "-")))
    rows.append(("window / preset", _distinct([window_text(p) for p in provenance]) or "-"))
    if summary.get("ordered_by"):
        rows.append(("ordered by", str(summary["ordered_by"])))
    if summary.get("series_slices") is not None and summary.get("slices") is not None:
        total, kept = summary["series_slices"], summary["slices"]
        rows.append(
            (
                "sampling",
                f"all {kept} slices"
                if kept == total
                else f"{total} slices sampled evenly to {kept}, first and last kept",
            )
        )
    positions = [p for p in summary.get("positions") or [] if p is not None]
    if positions:
        rows.append(
            (
                "positions",
                f"{_number(positions[0])} to {_number(positions[-1])} mm along the normal",
            )
        )
    if summary.get("value_range"):
        lo, hi = summary["value_range"]
        rows.append(("value range", f"{_number(lo)}..{_number(hi)} (one scale for the volume)"))
    if summary.get("skipped_files"):
        rows.append(("skipped files", str(summary["skipped_files"])))
    preview = summary.get("preview")
    if preview:
        rows.append(
            (
                "preview",
                f"{preview['layout']}: {preview['columns']}x{preview['rows']} cells of "
                f"{preview['thumb']} px, {preview['width']}x{preview['height']} px",
            )
        )
    warnings = [str(w) for w in summary.get("warnings") or []]
    rows.append(("warnings", "\n".join(warnings) if warnings else "none"))
    return rows


@image_app.command("inspect")
def inspect(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="A picture, a DICOM file, several pictures, or a series (a folder or several "
            "DICOM files of one CT or MR series).",
            metavar="PATH",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="The PNG file to write.", show_default=False)
    ],
    preset: Annotated[
        str | None,
        typer.Option("--preset", help="CT preset: lung, mediastinum, bone, brain or liver."),
    ] = None,
    window: Annotated[
        str | None,
        typer.Option("--window", metavar="C,W", help="Custom window CENTER,WIDTH (HU for CT)."),
    ] = None,
    modality: Annotated[
        str | None, typer.Option("--modality", help="CT or MR: force that recipe on DICOM.")
    ] = None,
    max_slices: Annotated[
        int | None,
        typer.Option("--max-slices", min=1, help="Most slices of a volume (default 85)."),
    ] = None,
    thumb: Annotated[
        int | None,
        typer.Option(
            "--thumb",
            min=16,
            max=896,
            help="Side of each image on the sheet in px (default 224; 896 for one image).",
        ),
    ] = None,
    columns: Annotated[
        int | None, typer.Option("--columns", min=1, help="Cells per row (default: near square).")
    ] = None,
    prior: Annotated[
        Path | None,
        typer.Option("--prior", help="A prior study of the one PATH: drawn as the pair sent."),
    ] = None,
    tiles: Annotated[
        bool, typer.Option("--tiles", help="Cut the one PATH (a slide) into tissue patches.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as JSON instead of a table.")
    ] = False,
) -> None:
    """Draw the prepared images as the model gets them into a PNG, and say what was done."""
    from coheara.imaging import preview

    check_out(out, [*paths, *([prior] if prior else [])])
    options: dict[str, Any] = {
        "preset": preset,
        "window": parse_window(window),
        "image_limits": load_settings().image_limits(),
    }
    if prior is not None:
        if len(paths) != 1 or modality or max_slices:
            raise InvalidRequestError("--prior goes with one PATH, without --modality/--max-slices")
        prepared = prepare_pair(paths[0], prior, **options)
    else:
        if max_slices is not None:
            options["max_slices"] = max_slices
        if tiles and len(paths) != 1:
            raise InvalidRequestError("--tiles goes with one PATH (a slide picture)")
        source = paths[0] if tiles else list(paths)
        prepared = prepare(source, modality=modality, tiles=tiles, **options)
    drawn = preview.render(prepared, thumb=thumb, columns=columns)
    _write_png(drawn.image, out)

    summary = prepared.summary()
    summary["preview"] = drawn.summary()
    if as_json:
        write(json.dumps(summary, indent=2, default=str) + "\n")
    else:
        table = Table(title="what the model will see", show_header=False)
        table.add_column("", style="bold")
        table.add_column("")
        for name, value in summary_rows(summary):
            table.add_row(escape(name), escape(value))
        Console().print(table)
    width, height = drawn.image.size
    err_console.print(f"preview written: {width}x{height} px PNG", markup=False)
