"""Image bytes -> the classifier's input tensor, with exactly the preprocessing the model card records."""

import io

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from kiln import api
from kiln_serving import codec, errors


def decode(data: bytes) -> Image.Image:
    """A fully decoded image; anything Pillow cannot read (or a decompression bomb) is the client's error."""
    if not data:
        raise errors.InvalidInput("empty image: send PNG or JPEG bytes as the body or as a multipart file")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise errors.InvalidInput(f"cannot decode the image (PNG or JPEG expected): {err}") from None
    return image


def to_tensor(image: Image.Image, pre: api.Preprocessing, dtype: np.dtype[np.generic]) -> codec.Array:
    """Resize to image_size², RGB (or grey), scale to [0, 1], normalise per channel, NCHW with a batch of 1."""
    mode = "L" if pre.channels == 1 else "RGB"
    resized = image.convert(mode).resize((pre.image_size, pre.image_size), Image.Resampling.BILINEAR)
    pixels = np.asarray(resized, dtype=np.float32) / 255.0
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    mean = np.asarray(pre.mean, dtype=np.float32).reshape(1, 1, -1)
    std = np.asarray(pre.std, dtype=np.float32).reshape(1, 1, -1)
    if mean.size not in (1, pixels.shape[2]) or std.size not in (1, pixels.shape[2]):
        raise errors.InvalidInput(f"model card preprocessing has {mean.size} means for {pixels.shape[2]} channels")
    normalised = (pixels - mean) / std
    return np.ascontiguousarray(normalised.transpose(2, 0, 1)[None], dtype=dtype)


def softmax(logits: codec.Array) -> npt.NDArray[np.float64]:
    """Probabilities from logits, stable for large values."""
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    e = np.exp(x - x.max())
    result: npt.NDArray[np.float64] = e / e.sum()
    return result
