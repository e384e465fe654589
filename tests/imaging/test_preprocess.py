"""The model input against transformers' CLIPImageProcessor configured as in MODEL_FACTS.md."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cds_service.imaging.preprocess import (
    center_crop_box,
    model_input,
    resize_and_crop,
    short_side_size,
)
from cds_service.imaging.render import png_bytes
from tests.imaging.conftest import MEAN, STD


def clip_reference(image8: np.ndarray) -> np.ndarray:
    transformers = pytest.importorskip("transformers")
    # transformers 5 falls back to its PIL backend without torchvision; both follow the config.
    processor = transformers.CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": 512},
        resample=Image.Resampling.LANCZOS,
        do_center_crop=True,
        crop_size={"height": 512, "width": 512},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[MEAN],
        image_std=[STD],
        do_convert_rgb=False,
    )
    out = processor(images=Image.fromarray(image8, mode="L"), return_tensors="np")
    return np.asarray(out["pixel_values"][0])


@pytest.mark.parametrize("shape", [(700, 900), (1955, 1841), (512, 512), (600, 513)])
def test_model_input_matches_clip_image_processor(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    ours = model_input(image, MEAN, STD)
    reference = clip_reference(image)
    assert ours.shape == reference.shape == (1, 512, 512)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)


def test_short_side_and_crop_geometry() -> None:
    assert short_side_size(1955, 1841) == (543, 512)
    assert short_side_size(1000, 2000) == (512, 1024)
    assert center_crop_box(543, 512) == (15, 0)
    with pytest.raises(ValueError):
        short_side_size(0, 10)


def test_resize_and_crop_rejects_wrong_input() -> None:
    with pytest.raises(ValueError):
        resize_and_crop(np.zeros((10, 10), dtype=np.uint16))  # type: ignore[arg-type]
    assert resize_and_crop(np.full((600, 800), 7, dtype=np.uint8)).shape == (512, 512)


def test_png_round_trip_is_lossless() -> None:
    image = np.arange(256 * 3, dtype=np.uint16).reshape(24, 32).astype(np.uint8)
    import io

    back = np.asarray(Image.open(io.BytesIO(png_bytes(image))))
    assert back.dtype == np.uint8 and np.array_equal(back, image)
