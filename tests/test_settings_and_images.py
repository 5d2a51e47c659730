"""Configuration sources and precedence; the neutral image form and its failures."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coheara.errors import ConfigurationError, ImageError
from coheara.imaging import load_image
from coheara.settings import load_settings, normalize_ollama_host


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("OLLAMA_HOST", "COHEARA_CONFIG", "COHEARA_NUM_CTX", "COHEARA_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", "http://127.0.0.1:11434"),
        ("0.0.0.0", "http://127.0.0.1:11434"),
        ("gpu-box:12000", "http://gpu-box:12000"),
        (":9999", "http://127.0.0.1:9999"),
        ("https://ollama.internal", "https://ollama.internal:443"),
        ("http://gpu-box", "http://gpu-box:80"),
        ("http://10.1.2.3:11434/", "http://10.1.2.3:11434"),
    ],
)
def test_ollama_host_forms(value: str, expected: str) -> None:
    assert normalize_ollama_host(value) == expected


def test_defaults() -> None:
    settings = load_settings()
    assert settings.backend == "auto"
    assert settings.ollama_url == "http://127.0.0.1:11434"
    assert settings.ollama_model == "MedAIBase/MedGemma1.5:4b"
    assert settings.num_ctx == 8192
    assert settings.host == "127.0.0.1"


def test_ollama_host_env_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:5555")
    assert load_settings().ollama_url == "http://127.0.0.1:5555"


def test_precedence_arguments_env_toml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text('num_ctx = 16384\nbackend = "openai"\nmax_output_tokens = 300\n')
    monkeypatch.setenv("COHEARA_CONFIG", str(config))
    monkeypatch.setenv("COHEARA_NUM_CTX", "32768")
    settings = load_settings(max_output_tokens=500)
    assert settings.backend == "openai"  # from the file
    assert settings.num_ctx == 32768  # environment beats the file
    assert settings.max_output_tokens == 500  # explicit beats both


def test_local_coheara_toml_is_found(tmp_path: Path) -> None:
    (tmp_path / "coheara.toml").write_text("num_ctx = 4096\n")
    assert load_settings().num_ctx == 4096


@pytest.mark.parametrize(
    ("env", "value"), [("COHEARA_NUM_CTX", "999999"), ("COHEARA_BACKEND", "llamafile")]
)
def test_invalid_settings_are_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert env in str(caught.value)


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color=128 if mode == "L" else (200, 10, 10)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def test_any_image_becomes_896_square_rgb() -> None:
    image = load_image(_png(300, 120))
    assert image.pixels.shape == (896, 896, 3)
    assert tuple(image.pixels[400, 400]) == (200, 10, 10)


def test_grayscale_16bit_array_is_scaled_not_crushed() -> None:
    array = np.linspace(0, 4095, 64 * 64, dtype=np.uint16).reshape(64, 64)
    image = load_image(array)
    assert image.pixels.min() == 0 and image.pixels.max() == 255
    assert (image.pixels[..., 0] == image.pixels[..., 2]).all()


def test_base64_and_data_uri_and_path_agree(tmp_path: Path) -> None:
    data = _png(50, 50)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    encoded = base64.b64encode(data).decode()
    from_b64 = load_image(encoded)
    from_uri = load_image("data:image/png;base64," + encoded)
    from_path = load_image(path)
    assert (from_b64.pixels == from_uri.pixels).all() and (
        from_b64.pixels == from_path.pixels
    ).all()
    assert load_image(from_b64.png_bytes()).pixels.tolist() == from_b64.pixels.tolist()


@pytest.mark.parametrize(
    "bad",
    [b"", b"not an image at all", _png(40, 40)[:60], "%%%not-base64%%%", Path("/nonexistent.png")],
)
def test_broken_images_are_typed_errors(bad: object) -> None:
    with pytest.raises(ImageError):
        load_image(bad)  # type: ignore[arg-type]


def test_decompression_bomb_is_refused() -> None:
    from coheara.imaging import limits

    with (
        limits.applied(limits.ImageLimits(max_pixels=100)),
        pytest.raises(ImageError, match="more than 100 pixels"),
    ):
        load_image(_png(100, 100))
    assert load_image(_png(100, 100)).pixels.shape == (896, 896, 3)  # the limit is gone


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_encoded_16bit_image_is_scaled_not_clipped(mode: str) -> None:
    values = np.linspace(0, 4095, 64 * 64).reshape(64, 64)
    image = Image.fromarray(values.astype(np.int32)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if mode == "I;16" else "TIFF")
    prepared = load_image(buffer.getvalue())
    assert prepared.pixels.min() == 0 and prepared.pixels.max() == 255
    assert 100 < prepared.pixels.mean() < 155  # a ramp stays a ramp, not a white sheet


def test_long_base64_string_is_not_taken_for_a_path() -> None:
    encoded = base64.b64encode(_png(30, 30)).decode()
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    assert load_image(wrapped).pixels.shape == (896, 896, 3)
    with pytest.raises(ImageError):
        load_image("A" * 1000)
