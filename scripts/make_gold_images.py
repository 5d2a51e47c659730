"""Regenerate the synthetic images of the shipped gold sets, byte for byte the same each run.

The pictures are shapes and gradients drawn with numpy and Pillow (a chest film with lung
fields and a patch of consolidation, a skin lesion, a fundus, a histology patch); the
CT and MR series are small synthetic volumes written with pydicom (fixed UIDs, no
dates, no patient module). None of them comes from a patient or a device, and none is
meant to look like one closely enough to be read: they exercise the imaging path of
`coheara eval` (decoding, preparation, image counts), not a model's eyes.

Usage: python scripts/make_gold_images.py [OUTPUT_FOLDER]
(default: src/coheara/evaluation/gold/images next to this script's repository)
"""

from __future__ import annotations

import hashlib
import io
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEFAULT_FOLDER = (
    Path(__file__).resolve().parent.parent / "src" / "coheara" / "evaluation" / "gold" / "images"
)
SIDE = 256
"""Pictures are 256 px a side: small files, still above the 64 px the tiler accepts."""
VOLUME_SIDE = 64
VOLUME_SLICES = 8
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


# ----- helpers -------------------------------------------------------------------------------


def _grid(side: int = SIDE) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in [-1, 1], (y, x)."""
    axis = (np.arange(side, dtype=np.float64) + 0.5) / side * 2.0 - 1.0
    y, x = np.meshgrid(axis, axis, indexing="ij")
    return y, x


def _ellipse(
    y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float
) -> np.ndarray:
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def _blob(y: np.ndarray, x: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """A soft round density, 1 at its centre and fading to 0 at `r`."""
    d = np.sqrt((y - cy) ** 2 + (x - cx) ** 2) / r
    return np.clip(1.0 - d**2, 0.0, 1.0)


def _texture(seed: int, side: int = SIDE, amount: float = 6.0) -> np.ndarray:
    """Fixed-seed, smoothed noise: a little grain that compresses well."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0.0, 1.0, (side // 8, side // 8))
    return np.kron(coarse, np.ones((8, 8)))[:side, :side] * amount


def _png(pixels: np.ndarray) -> bytes:
    image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


# ----- chest films ---------------------------------------------------------------------------


def chest(
    seed: int,
    *,
    consolidation: str | None = None,
    effusion: str | None = None,
    heart: float = 0.26,
    child: bool = False,
) -> bytes:
    """A frontal chest film: dark lung fields, a bright mediastinum and heart, rib arcs,
    diaphragm domes; optionally a patch of consolidation ('right lower', 'left upper')
    or a pleural effusion ('left', 'right') that blunts the costophrenic angle."""
    y, x = _grid()
    film = 200.0 - 40.0 * (y + 1.0) / 2.0  # soft tissue, brighter at the top
    for side in (-1.0, 1.0):
        lung = _ellipse(y, x, -0.05, side * 0.42, 0.62 if not child else 0.55, 0.30)
        film = np.where(lung, 60.0 + 25.0 * (y + 1.0) / 2.0, film)
        for rib in range(6):
            arc = np.abs((y - (-0.55 + rib * 0.19)) - 0.25 * (x - side * 0.42) ** 2) < 0.018
            film = np.where(lung & arc, film + 45.0, film)
    film = np.where(_ellipse(y, x, 0.25, -0.06, heart, heart * 1.15), 215.0, film)
    film = np.where(np.abs(x + 0.02) < 0.09, np.maximum(film, 205.0), film)
    film = np.where(y > 0.55 + 0.12 * np.cos(x * 2.2), 225.0, film)  # diaphragm and abdomen
    if consolidation is not None:
        cy = 0.35 if "lower" in consolidation else -0.35
        cx = -0.42 if "right" in consolidation else 0.42  # the patient's right is image left
        film = film + 120.0 * _blob(y, x, cy, cx, 0.22)
    if effusion is not None:
        cx = 0.42 if effusion == "left" else -0.42
        meniscus = (y > 0.30 - 0.35 * np.abs(x - cx) ** 1.5) & (np.abs(x - cx) < 0.32)
        film = np.where(meniscus, 215.0, film)
    return _png(film + _texture(seed))


# ----- skin ----------------------------------------------------------------------------------


def skin(seed: int, *, lesion: str) -> bytes:
    """Skin-tone background with one lesion: 'pigmented' (asymmetric, two browns, notched
    border), 'plaque' (ill-defined red scaly patch) or 'nodule' (pearly, with fine vessels)."""
    y, _ = _grid()
    base = np.stack([224.0 - 10.0 * y, 180.0 - 8.0 * y, 150.0 - 6.0 * y], axis=-1)
    picture = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    if lesion == "pigmented":
        draw.polygon(
            [(96, 80), (150, 70), (182, 104), (170, 150), (186, 176), (128, 190), (84, 160)],
            fill=(120, 72, 48),
        )
        draw.ellipse((120, 110, 168, 160), fill=(62, 36, 28))
        draw.ellipse((100, 150, 120, 170), fill=(150, 110, 120))
    elif lesion == "plaque":
        draw.ellipse((56, 70, 200, 190), fill=(200, 110, 100))
        for k in range(9):
            draw.line((70 + 14 * k, 90, 84 + 14 * k, 176), fill=(232, 214, 200), width=2)
    else:
        draw.ellipse((92, 92, 164, 164), fill=(236, 200, 190))
        draw.ellipse((112, 112, 144, 144), fill=(248, 226, 220))
        for k in range(4):
            draw.line((100 + 14 * k, 110, 118 + 12 * k, 150), fill=(190, 60, 60), width=1)
    pixels = np.asarray(picture.filter(ImageFilter.GaussianBlur(2)), dtype=np.float64)
    return _png(pixels + _texture(seed, amount=3.0)[..., None])


# ----- fundus --------------------------------------------------------------------------------


def fundus(
    seed: int, *, left: bool = False, lesions: str | None = None, cupping: bool = False
) -> bytes:
    """A colour fundus: orange-red disc of retina on black, a pale optic disc (nasal side),
    branching vessels, a darker macula; lesions 'diabetic' (red dots and yellow exudates)."""
    y, x = _grid()
    radial = np.sqrt(y**2 + x**2)
    retina = np.where(radial[..., None] < 0.95, [200.0, 90.0, 40.0], [0.0, 0.0, 0.0])
    retina = retina * np.clip(1.15 - 0.35 * radial, 0, 1)[..., None]
    picture = Image.fromarray(np.clip(retina, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    disc_x = 78 if not left else 178
    draw.ellipse((disc_x - 22, 106, disc_x + 22, 150), fill=(250, 210, 150))
    cup = 15 if cupping else 7
    draw.ellipse((disc_x - cup, 128 - cup, disc_x + cup, 128 + cup), fill=(255, 240, 210))
    for direction in (-1, 1):
        for spread in (0.6, 1.2):
            end_x = disc_x + (140 if not left else -140)
            draw.line(
                (disc_x, 128, (disc_x + end_x) // 2, 128 + direction * 50 * spread, end_x, 128),
                fill=(140, 30, 20),
                width=3,
            )
    draw.ellipse((116, 116, 140, 140), fill=(150, 60, 30))  # macula
    if lesions == "diabetic":
        rng = np.random.default_rng(seed)
        for cy, cx in rng.integers(70, 190, size=(10, 2)):
            draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=(120, 10, 10))
        for cy, cx in rng.integers(96, 160, size=(6, 2)):
            draw.ellipse((cx - 4, cy - 2, cx + 4, cy + 2), fill=(240, 220, 90))
    pixels = np.asarray(picture.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float64)
    return _png(pixels + _texture(seed, amount=2.0)[..., None] * (radial < 0.95)[..., None])


# ----- histology -----------------------------------------------------------------------------


def histology(seed: int, *, pattern: str) -> bytes:
    """An H&E-like patch: pink stroma, glands as rings of purple nuclei ('normal': regular
    round glands, one nuclear row; 'crowded': packed irregular glands, stacked nuclei) or
    sheets of nuclei ('sheet')."""
    rng = np.random.default_rng(seed)
    picture = Image.new("RGB", (SIDE, SIDE), (236, 170, 200))
    draw = ImageDraw.Draw(picture)
    if pattern == "sheet":
        for cy, cx in rng.integers(4, SIDE - 4, size=(420, 2)):
            r = int(rng.integers(3, 6))
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(90, 40, 130))
    else:
        crowded = pattern == "crowded"
        step = 56 if crowded else 84
        for gy in range(step // 2, SIDE, step):
            for gx in range(step // 2, SIDE, step):
                ry, rx = (step * 0.42, step * 0.30) if crowded else (step * 0.30, step * 0.30)
                draw.ellipse((gx - rx, gy - ry, gx + rx, gy + ry), fill=(250, 235, 240))
                rows = (0.0, 4.0) if crowded else (0.0,)
                for angle in np.linspace(0, 2 * np.pi, 18, endpoint=False):
                    for inset in rows:
                        cy = gy + (ry - inset) * np.sin(angle)
                        cx = gx + (rx - inset) * np.cos(angle)
                        r = 4 if crowded else 3
                        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(80, 30, 120))
    pixels = np.asarray(picture.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float64)
    return _png(pixels + _texture(seed, amount=3.0)[..., None])


# ----- CT and MR series ----------------------------------------------------------------------


def _uid(name: str) -> str:
    """A fixed UID under the 2.25 (UUID-derived) root, from a name: the same every run."""
    return "2.25." + str(int(hashlib.sha256(name.encode()).hexdigest()[:30], 16))


def _volume_ct_chest(k: int) -> np.ndarray:
    """Hounsfield units: soft-tissue body, air lungs, a bright spine; a round soft-tissue
    nodule in the right lung on slices 4 to 6."""
    y, x = _grid(VOLUME_SIDE)
    hu = np.full((VOLUME_SIDE, VOLUME_SIDE), -1000.0)
    hu = np.where(_ellipse(y, x, 0.0, 0.0, 0.70, 0.92), 40.0, hu)
    for side in (-1.0, 1.0):
        hu = np.where(_ellipse(y, x, -0.05, side * 0.45, 0.50, 0.32), -850.0, hu)
    hu = np.where(_ellipse(y, x, 0.55, 0.0, 0.12, 0.12), 700.0, hu)
    if 3 <= k <= 5:
        hu = np.where(_ellipse(y, x, -0.15, -0.45, 0.09, 0.09), 30.0, hu)
    return hu


def _volume_ct_head(k: int) -> np.ndarray:
    """Skull ring, brain, ventricles; a hyperdense collection in the right parietal region
    on slices 5 to 7."""
    y, x = _grid(VOLUME_SIDE)
    hu = np.full((VOLUME_SIDE, VOLUME_SIDE), -1000.0)
    hu = np.where(_ellipse(y, x, 0.0, 0.0, 0.85, 0.72), 1000.0, hu)
    hu = np.where(_ellipse(y, x, 0.0, 0.0, 0.78, 0.65), 35.0, hu)
    for side in (-1.0, 1.0):
        hu = np.where(_ellipse(y, x, 0.0, side * 0.12, 0.28, 0.07), 5.0, hu)
    if 4 <= k <= 6:
        hu = np.where(_ellipse(y, x, -0.25, -0.45, 0.18, 0.10), 70.0, hu)
    return hu


def _volume_mr_brain(k: int) -> np.ndarray:
    """Arbitrary MR signal: brain, darker ventricles, bright rim; a bright round focus in
    the left periventricular white matter on slices 3 and 4."""
    y, x = _grid(VOLUME_SIDE)
    signal = np.zeros((VOLUME_SIDE, VOLUME_SIDE))
    signal = np.where(_ellipse(y, x, 0.0, 0.0, 0.85, 0.72), 900.0, signal)
    signal = np.where(_ellipse(y, x, 0.0, 0.0, 0.78, 0.65), 500.0, signal)
    for side in (-1.0, 1.0):
        signal = np.where(_ellipse(y, x, 0.0, side * 0.12, 0.28, 0.07), 150.0, signal)
    if 2 <= k <= 3:
        signal = np.where(_ellipse(y, x, -0.10, 0.30, 0.07, 0.07), 1200.0, signal)
    return signal


def _dicom_slice(name: str, k: int, values: np.ndarray, *, modality: str, series: str) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    sop_class = CT_IMAGE if modality == "CT" else MR_IMAGE
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(_uid(f"{name}/{k}"))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(_uid("coheara-gold-images"))
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = _uid(f"{name}/study")
    ds.SeriesInstanceUID = series
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = k + 1
    ds.SeriesDescription = "SYNTHETIC PHANTOM"
    ds.ImagePositionPatient = [0.0, 0.0, 5.0 * k]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [4.0, 4.0]
    ds.SliceThickness = 5.0
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if modality == "CT":
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        stored = values + 1024.0
    else:
        stored = values
    ds.PixelData = np.clip(np.round(stored), 0, 65535).astype("<u2").tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def series(name: str, modality: str, slice_values: Callable[[int], np.ndarray]) -> dict[str, bytes]:
    """One series: `{name}-s01.dcm` ... in anatomical order, 5 mm apart."""
    uid = _uid(f"{name}/series")
    return {
        f"{name}-s{k + 1:02d}.dcm": _dicom_slice(
            name, k, slice_values(k), modality=modality, series=uid
        )
        for k in range(VOLUME_SLICES)
    }


# ----- the catalogue -------------------------------------------------------------------------


def catalogue() -> dict[str, bytes]:
    """Every file the gold sets name, by file name."""
    files = {
        "cxr-001.png": chest(1, consolidation="right lower"),
        "cxr-002.png": chest(2),
        "cxr-003.png": chest(3, effusion="left"),
        "cxr-004.png": chest(4, heart=0.22, child=True),
        "cxr-prior-001-current.png": chest(11),
        "cxr-prior-001-prior.png": chest(12, consolidation="right lower"),
        "cxr-prior-002-current.png": chest(13, effusion="left"),
        "cxr-prior-002-prior.png": chest(14),
        "cxr-prior-003-current.png": chest(15, heart=0.33),
        "cxr-prior-003-prior.png": chest(16, heart=0.33),
        "derm-001.png": skin(21, lesion="pigmented"),
        "derm-002.png": skin(22, lesion="plaque"),
        "derm-003.png": skin(23, lesion="nodule"),
        "fundus-001.png": fundus(31, lesions="diabetic"),
        "fundus-002-right.png": fundus(32),
        "fundus-002-left.png": fundus(33, left=True),
        "fundus-003.png": fundus(34, cupping=True),
        "path-001.png": histology(41, pattern="crowded"),
        "path-002.png": histology(42, pattern="normal"),
        "path-003.png": histology(43, pattern="sheet"),
    }
    files |= series("vol-ct-chest", "CT", _volume_ct_chest)
    files |= series("vol-ct-head", "CT", _volume_ct_head)
    files |= series("vol-mr-brain", "MR", _volume_mr_brain)
    return files


def write(folder: Path) -> list[Path]:
    """Write every image into `folder` (made if missing); returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in catalogue().items():
        path = folder / name
        path.write_bytes(data)
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    folder = Path(argv[1]) if len(argv) > 1 else DEFAULT_FOLDER
    paths = write(folder)
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} files, {total / 1024:.0f} KiB, to {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
