"""Reading images the same way everywhere: the data stage's check, the BLIP-2 op, the trainer and eval.

Real data sets hold JPEGs with an EXIF rotation, 16-bit grayscale PNGs, palette and CMYK images, and
truncated files. `open_rgb` gives every one as the upright 8-bit RGB picture a viewer shows;
`image_problem` tells the data stage which files cannot be used, whatever Data-Juicer set globally
(it imports with `ImageFile.LOAD_TRUNCATED_IMAGES = True`, which turns a truncated JPEG into a
grey-filled image without an error).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile, ImageOps

# The formats a shard keeps as they are (and the trainer decodes); others are re-encoded as PNG.
SHARD_FORMATS = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp"}


def open_rgb(source: str | Path | bytes) -> Image.Image:
    """The image at `source` (a path or encoded bytes), upright (EXIF orientation applied), as 8-bit RGB."""
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":  # 16-bit or float grayscale: scale to 8 bits
        sixteen_bit = image.mode.startswith("I;16")
        image = image.convert("F")  # convert("L") would clip 16-bit values to white
        if sixteen_bit:  # 0..65535 whatever this image's own range: a dark image stays dark
            scale = 1 / 256
        else:  # "I" (32-bit) or "F" declare no range: 0..1, 0..255 or 0..65535, guessed from the brightest value
            top = image.getextrema()[1]
            scale = 255.0 if top <= 1.0 else 1 / 256 if top > 255 else 1.0
        image = image.point(lambda value: value * scale).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")  # transparent parts on white, as a viewer shows them, not black
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def image_problem(path: Path) -> str | None:
    """None if `path` is an image that decodes completely, else the reason it cannot be used:
    `missing_image`, `too_large_image` (past PIL's decompression-bomb limit) or `corrupt_image`
    (unreadable, or truncated)."""
    if not path.is_file():
        return "missing_image"
    truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error here, not a grey fill
    try:
        open_rgb(path)  # decoded in full, as every reader will
    except Image.DecompressionBombError:
        return "too_large_image"
    except FileNotFoundError:  # gone since `is_file`
        return "missing_image"
    except OSError as error:
        if error.errno is not None:  # the disk's error (EIO, EACCES, EMFILE), not the file's: dropped for good
            raise
        return "corrupt_image"  # PIL's own errors (unidentified, truncated) carry no errno
    except (SyntaxError, ValueError):
        return "corrupt_image"
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
    return None


def shard_image(path: Path) -> tuple[str, bytes]:
    """(extension, bytes) of the image as a shard stores it: the original bytes for PNG, JPEG and WebP,
    else (BMP, GIF, TIFF, ...) the picture re-encoded as PNG, which the trainer decodes."""
    extension = SHARD_FORMATS.get(path.suffix.lower().lstrip("."))
    if extension is None:
        with Image.open(path) as image:
            kind = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(image.format or "")
        extension = kind  # a JPEG named .jfif or without a suffix keeps its bytes
    if extension is not None:
        return extension, path.read_bytes()
    buffer = io.BytesIO()
    open_rgb(path).save(buffer, format="PNG")
    return "png", buffer.getvalue()


@dataclass(frozen=True)
class EncodedImage:
    """An image kept as its file's bytes and decoded only when used: an evaluated split of thousands of real
    images holds their files' compressed size rather than their pixels (640 x 480 x 3 bytes: 0.9 MB each)."""

    data: bytes

    def decode(self) -> Image.Image:
        return open_rgb(self.data)


def as_image(image: Image.Image | EncodedImage) -> Image.Image:
    """The decoded image of either kind."""
    return image.decode() if isinstance(image, EncodedImage) else image
