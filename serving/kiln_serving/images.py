"""Image bytes -> the classifier's input tensor, with exactly the preprocessing the model card records.

Only the formats in FORMATS are opened (Pillow is told so, so no other plugin runs, and never one that
calls an external program such as Ghostscript for EPS). Pixels are scaled by their mode's full range:
16-bit greyscale by 65535, everything else (palette, CMYK, alpha, 1-bit) converted by Pillow to 8-bit
RGB or L first, alpha dropped as the trainer's loader drops it.
"""

import io

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from kiln import api
from kiln_serving import codec, errors

# The documented allow-list: format name -> its file signature.
FORMATS = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff"}
# Largest image decoded (width x height); a 0.2 MB PNG can claim 13000 x 13000. Checked from the header, before
# any pixel is decoded; Pillow's own check (a warning past 89 M pixels, its error past 179 M) is left off, so
# the answer names this limit and the log holds no warning per request.
MAX_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = None
# Integer modes wider than 8 bits and the value that means full intensity.
_WIDE = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def decode(data: bytes) -> Image.Image:
    """A fully decoded PNG or JPEG; UnsupportedMediaType for other formats, InvalidInput for broken ones."""
    if not data:
        raise errors.InvalidInput("empty image: send PNG or JPEG bytes as the body or as a multipart file")
    if not any(data.startswith(signature) for signature in FORMATS.values()):
        raise errors.UnsupportedMediaType(f"unsupported image format; send one of {', '.join(FORMATS)}")
    try:
        image = Image.open(io.BytesIO(data), formats=list(FORMATS))
        if image.width * image.height > MAX_PIXELS:
            raise errors.InvalidInput(
                f"image of {image.width}x{image.height} pixels is over the limit of {MAX_PIXELS} pixels"
            )
        image.load()
    except UnidentifiedImageError:  # its message names the BytesIO object: nothing the client sent
        raise errors.InvalidInput("cannot decode the image (PNG or JPEG expected): its header is not valid") from None
    except (OSError, ValueError) as err:
        raise errors.InvalidInput(f"cannot decode the image (PNG or JPEG expected): {err}") from None
    return image


def _pixels(image: Image.Image, channels: int, size: int) -> npt.NDArray[np.float32]:
    """H x W x C floats in [0, 1] at size x size."""
    full = _WIDE.get(image.mode)
    if full is None:
        resized = image.convert("L" if channels == 1 else "RGB").resize((size, size), Image.Resampling.BILINEAR)
        pixels = np.asarray(resized, dtype=np.float32) / 255.0
        return pixels[:, :, None] if pixels.ndim == 2 else pixels
    # Wide greyscale: resize as 32-bit float (Pillow's "F"), scale, then repeat for RGB models.
    grey = Image.fromarray(np.asarray(image, dtype=np.float32))
    values = np.asarray(grey.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / full
    return np.repeat(values[:, :, None], channels, axis=2)


def to_tensor(image: Image.Image, pre: api.Preprocessing, dtype: np.dtype[np.generic]) -> codec.Array:
    """Resize to image_size², RGB (or grey), scale to [0, 1], normalise per channel, NCHW with a batch of 1."""
    pixels = _pixels(image, 1 if pre.channels == 1 else 3, pre.image_size)
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
