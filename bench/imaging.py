"""DICOM to model-ready pixels: Coheara beside pydicom plus transformers' Gemma3ImageProcessor.

Synthetic inputs made in the run (fixed seed, nothing downloaded): a 512x512 CT slice
(int16, RescaleIntercept -1024, explicit VR little endian) and CT series of 85 and 200
files (the latter sampled to 85), plus an 85-slice MR series (one min-max over the
volume). File names are shuffled so both sides must order by ImagePositionPatient.

Coheara: `load_dicom` to the 896x896x3 uint8 array, its `png_bytes()` (the wire PNG,
a fresh image each round), `load_volume` and `prepare` on the folder. The baseline does
the same work the naive way: `pydicom.dcmread`, `pixel_array`, rescale to HU, the three
CT windows (or the volume min-max) in numpy, then `Gemma3ImageProcessor` (size 896,
bilinear, rescale and normalize to [-1, 1]) to pixel_values, the float tensor the
model-ready array replaces. The PNG baseline resizes with Pillow (bilinear) and encodes
at Coheara's compress level 1. One thread, one core (pinned where the OS allows).
Medians, with p90 beside them, after one warm-up; ratio = baseline / coheara.

    python bench/imaging.py [--rounds 7]
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"  # before numpy and torch load: one thread, as in the title
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no torchvision fallback notice

import argparse  # noqa: E402
import io  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from transformers import Gemma3ImageProcessor  # noqa: E402

from coheara.imaging.dicom import load_dicom  # noqa: E402
from coheara.imaging.prepare import prepare  # noqa: E402
from coheara.imaging.volume import load_volume  # noqa: E402

SIDE, SLICES = 512, 85
WINDOWS = ((-1024.0, 1024.0), (-135.0, 215.0), (0.0, 80.0))  # red, green, blue, in HU
SOP = {"CT": UID("1.2.840.10008.5.1.4.1.1.2"), "MR": UID("1.2.840.10008.5.1.4.1.1.4")}


def phantom(rng: np.random.Generator, z: float, modality: str) -> np.ndarray:
    """A chest-like slice: air, soft-tissue body, two lungs that change along z, a spine."""
    y, x = np.ogrid[-SIDE // 2 : SIDE // 2, -SIDE // 2 : SIDE // 2]
    lung = 0.6 + 0.3 * np.sin(z / 60.0)
    body = (x / 210.0) ** 2 + (y / 160.0) ** 2 <= 1
    lungs = ((np.abs(x) - 90) / (60 * lung)) ** 2 + (y / (100 * lung)) ** 2 <= 1
    spine = (x**2 + (y - 110) ** 2) <= 25**2
    if modality == "CT":  # Hounsfield units: air -1000, soft tissue 40, lung -850, bone 700
        values = np.full((SIDE, SIDE), -1000.0)
        values[body], values[lungs & body], values[spine] = 40.0, -850.0, 700.0
        noise = 12.0
    else:  # MR signal, arbitrary units: dark air and bone, bright tissue
        values = np.zeros((SIDE, SIDE))
        values[body], values[lungs & body], values[spine] = 900.0 + 3 * z, 60.0, 250.0
        noise = 20.0
    return values + rng.normal(0.0, noise, values.shape)


def write_slice(path: Path, values: np.ndarray, modality: str, series: str, n: int) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP[modality]
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[series, str(n)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SOP[modality], meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = modality, series, 1
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["study"])
    ds.InstanceNumber = n
    ds.ImagePositionPatient = [-250.0, -250.0, -1.25 * n]  # head first: z falls as n grows
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing, ds.SliceThickness = [0.977, 0.977], 1.25
    ds.Rows = ds.Columns = SIDE
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    if modality == "CT":
        ds.PixelRepresentation, ds.RescaleSlope, ds.RescaleIntercept = 1, 1, -1024
        stored = np.round(values + 1024).astype(np.int16)
    else:
        ds.PixelRepresentation = 0
        stored = np.round(np.clip(values, 0, 65535)).astype(np.uint16)
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_series(folder: Path, count: int, modality: str, seed: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    series = generate_uid(entropy_srcs=[folder.name])
    names = rng.permutation(count)  # file order is not anatomical order
    for n in range(1, count + 1):
        values = phantom(rng, 1.25 * n, modality)
        write_slice(folder / f"IM{names[n - 1]:04d}.dcm", values, modality, series, n)
    return folder


def naive_hu(ds: Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def naive_windows(hu: np.ndarray) -> np.ndarray:
    channels = [np.clip((hu - lo) / (hi - lo), 0.0, 1.0) * 255.0 for lo, hi in WINDOWS]
    return np.round(np.stack(channels, axis=-1)).astype(np.uint8)


def naive_series(folder: Path) -> list[Dataset]:
    """Every file read whole, sorted along the slice normal, 85 kept evenly."""
    datasets = [pydicom.dcmread(path) for path in sorted(folder.iterdir())]
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    datasets.sort(key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient), normal)))
    keep = np.round(np.linspace(0, len(datasets) - 1, min(SLICES, len(datasets)))).astype(int)
    return [datasets[i] for i in keep]


def baseline_volume(folder: Path, processor: Any) -> np.ndarray:
    datasets = naive_series(folder)
    if datasets[0].Modality == "CT":
        images = [naive_windows(naive_hu(ds)) for ds in datasets]
    else:
        stack = np.stack([ds.pixel_array.astype(np.float64) for ds in datasets])
        lo, hi = stack.min(), stack.max()
        gray = np.round((stack - lo) * 255.0 / (hi - lo)).astype(np.uint8)
        images = [np.stack([g, g, g], axis=-1) for g in gray]
    return np.asarray(processor(images=images, return_tensors="np")["pixel_values"])


def baseline_png(path: Path) -> bytes:
    rgb = naive_windows(naive_hu(pydicom.dcmread(path)))
    resized = Image.fromarray(rgb).resize((896, 896), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    resized.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def max_diff(ours: list[np.ndarray], pixel_values: np.ndarray) -> int:
    """Largest gap, in 0..255 levels, between our pixels and the processor's, denormalized."""
    worst = 0
    for mine, theirs in zip(ours, pixel_values, strict=True):
        back = np.round((theirs.transpose(1, 2, 0) * 0.5 + 0.5) * 255.0)
        worst = max(worst, int(np.abs(mine.astype(np.float64) - back).max()))
    return worst


def measure(
    ours: Callable[[], object], theirs: Callable[[], object], rounds: int
) -> tuple[list[float], list[float]]:
    """One warm-up each, then the two sides alternate, round by round."""
    ours(), theirs()
    a: list[float] = []
    b: list[float] = []
    for _ in range(rounds):
        for call, into in ((ours, a), (theirs, b)):
            started = time.perf_counter()
            call()
            into.append(time.perf_counter() - started)
    return a, b


def _ms(values: list[float], q: float = 0.5) -> float:
    if q == 0.5:
        return 1000 * statistics.median(values)
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def pin_one_core() -> str:
    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return f"pinned to CPU {core}"
    return "not pinned"


def main(rounds: int) -> None:
    pinned = pin_one_core()
    console = Console(width=150)
    processor = Gemma3ImageProcessor(size={"height": 896, "width": 896})
    assert processor.resample == Image.Resampling.BILINEAR and processor.do_normalize
    assert list(processor.image_mean) == list(processor.image_std) == [0.5, 0.5, 0.5]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        console.print("writing synthetic DICOM (85 + 200 CT files, 85 MR files) ...")
        ct85 = write_series(root / "ct85", SLICES, "CT", seed=1)
        ct200 = write_series(root / "ct200", 200, "CT", seed=2)
        mr85 = write_series(root / "mr85", SLICES, "MR", seed=3)
        one = next(iter(sorted(ct85.iterdir())))

        def baseline_array() -> np.ndarray:
            rgb = naive_windows(naive_hu(pydicom.dcmread(one)))
            return np.asarray(processor(images=rgb, return_tensors="np")["pixel_values"])

        # Same pixels on both sides? Every check below compares whole outputs.
        diffs = [max_diff([load_dicom(one)[0].pixels], baseline_array())]
        for folder in (ct200, mr85):
            volume = load_volume(folder)
            assert len(volume.slices) == SLICES and volume.ordered_by == "position"
            pixels = [image.pixels for image in volume.slices]
            diffs.append(max_diff(pixels, baseline_volume(folder, processor)))
        volumes = (
            ("CT 85 files: load_volume", load_volume, ct85),
            ("CT 85 files: prepare", prepare, ct85),
            ("CT 200 files -> 85: load_volume", load_volume, ct200),
            ("MR 85 files: load_volume", load_volume, mr85),
        )
        png = partial(baseline_png, one)
        cases: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
            ("CT slice -> 896 array", lambda: load_dicom(one)[0].pixels, baseline_array),
            ("CT slice -> wire PNG", lambda: load_dicom(one)[0].png_bytes(), png),
        ]
        for name, run, folder in volumes:
            cases.append((name, partial(run, folder), partial(baseline_volume, folder, processor)))
        table = Table(
            title=f"512x512 DICOM to 896x896 RGB, one thread ({pinned}), {rounds} rounds",
            caption=(
                f"baseline: pydicom + numpy windows + {type(processor).__name__} (float "
                f"pixel_values; PNG row: Pillow resize + PNG); max |diff| in 0..255 levels, "
                f"slice / CT 200->85 / MR volume: {' / '.join(map(str, diffs))}"
            ),
        )
        for column in COLUMNS:
            table.add_column(column, justify="left" if column == "case" else "right")
        speedups: list[float] = []
        medians: list[float] = []
        for name, coheara_call, baseline_call in cases:
            a, b = measure(coheara_call, baseline_call, rounds)
            speedups.append(statistics.median(b) / statistics.median(a))
            medians.append(_ms(a))
            times = (_ms(a), _ms(a, 0.9), _ms(b), _ms(b, 0.9))
            table.add_row(name, *(f"{t:.1f}" for t in times), f"{speedups[-1]:.2f}x")
        console.print(table)
        array, ct_volume = speedups[0], medians[2]
        console.print(
            f"goals: array path {array:.2f}x the baseline (goal 2x): "
            f"{'met' if array >= 2 else 'NOT met'}; 85-slice CT volume {ct_volume:.0f} ms "
            f"(goal well under 1 s; 500 ms here): {'met' if ct_volume < 500 else 'NOT met'}"
        )


COLUMNS = ("case", "coheara p50 ms", "p90", "baseline p50 ms", "p90", "baseline / coheara")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    arguments = parser.parse_args()
    main(arguments.rounds)
