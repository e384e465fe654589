"""The model's own preprocessing (MODEL_FACTS.md "Preprocessing"): short side to `size` with
PIL LANCZOS, center crop `size` x `size`, scale by 1/255, normalise with the checkpoint's
one-channel mean and std."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from PIL import Image

MODEL_SIZE = 512


def short_side_size(height: int, width: int, size: int = MODEL_SIZE) -> tuple[int, int]:
    """(height, width) after scaling the short side to `size`, keeping the aspect ratio.

    The long side is truncated like transformers' `get_resize_output_image_size` (int()).
    """
    if height <= 0 or width <= 0:
        raise ValueError("an image needs a positive height and width")
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def center_crop_box(height: int, width: int, size: int = MODEL_SIZE) -> tuple[int, int]:
    """Top and left offsets of a centered `size` x `size` crop (no padding)."""
    if height < size or width < size:
        raise ValueError(f"cannot center-crop {size}x{size} from {height}x{width}")
    return (height - size) // 2, (width - size) // 2


def resize_and_crop(image8: npt.NDArray[np.uint8], size: int = MODEL_SIZE) -> npt.NDArray[np.uint8]:
    """Short side to `size` (PIL LANCZOS), then the centered `size` x `size` crop."""
    if image8.dtype != np.uint8 or image8.ndim != 2:
        raise ValueError("resize_and_crop needs a 2-D uint8 image")
    height, width = image8.shape
    new_height, new_width = short_side_size(height, width, size)
    resized = Image.fromarray(image8, mode="L").resize(
        (new_width, new_height), resample=Image.Resampling.LANCZOS
    )
    top, left = center_crop_box(new_height, new_width, size)
    return np.asarray(resized)[top : top + size, left : left + size].copy()


def model_input(
    image8: npt.NDArray[np.uint8], mean: float, std: float, size: int = MODEL_SIZE
) -> npt.NDArray[np.float32]:
    """The normalised model tensor, shape (1, size, size), float32."""
    if std <= 0:
        raise ValueError("std must be positive")
    cropped = resize_and_crop(image8, size).astype(np.float32)
    scaled = cropped * np.float32(1.0 / 255.0)
    return ((scaled - np.float32(mean)) / np.float32(std))[np.newaxis, :, :]
