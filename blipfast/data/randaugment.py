"""BLIP's ``RandomAugment``: Salesforce BLIP's ``transform/randaugment.py`` (LAVIS' ``lavis/processors/randaugment.py``
is the same code), reproduced with numpy and PIL, without OpenCV.

The references train with ``RandomAugment(2, 5, isPIL=True, augs=BLIP_AUGS)``: two operations drawn with
replacement from the list, each applied with probability 0.5, at magnitude 5 of 10 (a shear of 0.15, a shift of
5 pixels, a turn of 15 degrees, each with a random sign, grey (128) where the image has no pixel). torchvision's
``RandAugment`` is another augmentation: it draws from 14 operations (Color, Contrast, Posterize and Solarize
too), applies every operation it draws, shifts by a fraction of the image (up to 0.45 of it) where BLIP shifts
by a fixed number of pixels, and resamples with its own affine warp (pixel centres at +0.5) where BLIP calls
OpenCV's ``warpAffine``. So the operations are restated here, each as the reference computes it:

- ``ShearX/Y``, ``TranslateX/Y``, ``Rotate``: :func:`warp_affine` is OpenCV's ``warpAffine`` (``INTER_LINEAR``,
  constant border (128, 128, 128)) as OpenCV computes it for uint8 images: the matrix inverted in double precision,
  source coordinates rounded to 1/32 pixel in fixed point, integer bilinear weights, round half up. ``Rotate`` turns about (W/2, H/2), OpenCV's
  ``getRotationMatrix2D``; ``ShearX`` maps output (x, y) to input (x - s y, y), the opposite sign of PIL's
  shear (the sign is drawn at random, so the distribution is the same).
- ``Sharpness``: OpenCV's ``filter2D`` with the 3x3 kernel (1 1 1; 1 5 1; 1 1 1) / 13 (float32 sums, reflected
  border, rounded to the nearest integer), then BLIP's blend of the interior. At the references' magnitude
  (factor 1.0) it returns the image unchanged, as BLIP's does.
- ``AutoContrast``: BLIP's own code, quirk included: it computes the offset as ``-low * scale`` with ``low`` a
  numpy uint8, which wraps to ``256 - low``, so every channel whose minimum is above 0 becomes 255 (only channels
  that reach 0 are stretched as PIL's ``autocontrast`` would). ``RandomAugment(pil_autocontrast=True)`` uses PIL's
  ``ImageOps.autocontrast`` instead (what the function's docstring promises).
- ``Equalize`` is PIL's ``ImageOps.equalize`` (BLIP's function reproduces it exactly); ``Identity``,
  ``Brightness``, ``Solarize``, ``Color``, ``Contrast`` and ``Posterize`` are BLIP's numpy code. At magnitude 5
  the enhance factor is exactly 1.0, so ``Brightness`` and ``Sharpness`` leave the image as it is.

How exact: every operation gave BLIP's own function's output bit for bit, on OpenCV 4.10 and 4.12, for 3,000
random images (1 to 40 pixels a side) at every magnitude and a few hundred 224 px ones;
tests/data/test_transforms.py keeps outputs recorded from OpenCV and restates BLIP's numpy operations.

Random draws: :meth:`RandomAugment.sample` makes BLIP's draws in BLIP's order (``rng.choice(augs, N)``, then per
operation ``rng.random() > 0.5`` to skip it and, for shears, translations and rotations, one more draw for the
sign) from the ``numpy.random.RandomState`` it is given instead of numpy's global state: seeded alike, it applies
the same operations with the same arguments as BLIP's.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["BLIP_AUGS", "OPS", "RandomAugment", "warp_affine", "rotation_matrix"]

# the list that Salesforce BLIP's data/__init__.py and LAVIS' blip_image_train pass as augs
BLIP_AUGS = ("Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize", "ShearX", "ShearY", "TranslateX",
             "TranslateY", "Rotate")
MAX_LEVEL = 10
TRANSLATE_CONST = 10
REPLACE = (128, 128, 128)


# ---- geometry: OpenCV's warpAffine (INTER_LINEAR, BORDER_CONSTANT) on uint8 images --------------------------------

def rotation_matrix(center: tuple, degrees: float) -> np.ndarray:
    """OpenCV's ``getRotationMatrix2D(center, degrees, 1)``: a counter-clockwise turn (y down) about ``center``."""
    a = math.cos(degrees * math.pi / 180.0)
    b = math.sin(degrees * math.pi / 180.0)
    cx, cy = center
    return np.array([[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy]], dtype=np.float64)


def warp_affine(img: np.ndarray, matrix, fill=REPLACE) -> np.ndarray:
    """``cv2.warpAffine(img, matrix, (W, H), flags=INTER_LINEAR, borderValue=fill)`` for a uint8 [H, W, C] image:
    output pixel (x, y) samples the input at ``inverse(matrix) @ (x, y, 1)``, bilinearly, with ``fill`` outside."""
    m = np.asarray(matrix, dtype=np.float64).reshape(6).copy()  # OpenCV converts the matrix to double
    det = m[0] * m[4] - m[1] * m[3]
    det = 1.0 / det if det != 0 else 0.0
    a11, a22 = m[4] * det, m[0] * det
    m[0], m[1], m[3], m[4] = a11, -m[1] * det, -m[3] * det, a22
    m[2], m[5] = -m[0] * m[2] - m[1] * m[5], -m[3] * m[2] - m[4] * m[5]
    h, w, c = img.shape
    xs, ys = np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)
    # fixed point: 10 fractional bits, rounded (half to even, as cvRound), then 5 bits (1/32 pixel), floored
    x_col = np.rint(m[0] * xs * 1024).astype(np.int64)
    y_col = np.rint(m[3] * xs * 1024).astype(np.int64)
    x_row = np.rint((m[1] * ys + m[2]) * 1024).astype(np.int64) + 16
    y_row = np.rint((m[4] * ys + m[5]) * 1024).astype(np.int64) + 16
    sx = (x_row[:, None] + x_col[None, :]) >> 5
    sy = (y_row[:, None] + y_col[None, :]) >> 5
    ix, fx, iy, fy = sx >> 5, sx & 31, sy >> 5, sy & 31
    padded = np.empty((h + 2, w + 2, c), dtype=np.int64)  # one ring of `fill`: neighbours outside read it
    padded[...] = np.asarray(fill, dtype=np.int64)[:c]
    padded[1:-1, 1:-1] = img
    x0, x1 = np.clip(ix + 1, 0, w + 1), np.clip(ix + 2, 0, w + 1)
    y0, y1 = np.clip(iy + 1, 0, h + 1), np.clip(iy + 2, 0, h + 1)
    # OpenCV's bilinear weights in units of 2^-15: (32 - fx)(32 - fy) * 32, ... (exact integers, summing to 2^15)
    w00, w01 = ((32 - fx) * (32 - fy))[..., None], (fx * (32 - fy))[..., None]
    w10, w11 = ((32 - fx) * fy)[..., None], (fx * fy)[..., None]
    acc = (padded[y0, x0] * w00 + padded[y0, x1] * w01 + padded[y1, x0] * w10 + padded[y1, x1] * w11) * 32
    return ((acc + (1 << 14)) >> 15).astype(np.uint8)


# ---- the operations: (uint8 [H, W, 3] array, *args) -> uint8 array, as BLIP's func_dict ---------------------------

def identity(img):
    return img


def autocontrast(img, pil: bool = False):
    if pil:
        from PIL import Image, ImageOps

        return np.array(ImageOps.autocontrast(Image.fromarray(img)))
    out = np.empty_like(img)
    for k in range(img.shape[2]):
        ch = img[..., k]
        low, high = int(ch.min()), int(ch.max())
        if high <= low:
            out[..., k] = ch
            continue
        scale = 255 / (high - low)
        offset = ((-low) % 256) * scale  # BLIP: `-low * scale` on a numpy uint8 wraps to (256 - low) * scale
        table = np.arange(256) * scale + offset
        out[..., k] = table.clip(0, 255).astype(np.uint8)[ch]
    return out


def equalize(img):
    from PIL import Image, ImageOps

    return np.array(ImageOps.equalize(Image.fromarray(img)))


def rotate(img, degrees, fill=REPLACE):
    h, w = img.shape[:2]
    return warp_affine(img, rotation_matrix((w / 2, h / 2), degrees), fill)


def solarize(img, thresh=128):
    table = np.array([el if el < thresh else 255 - el for el in range(256)]).clip(0, 255).astype(np.uint8)
    return table[img]


def color(img, factor):
    m = np.float32([[0.886, -0.114, -0.114], [-0.587, 0.413, -0.587], [-0.299, -0.299, 0.701]]) * factor \
        + np.float32([[0.114], [0.587], [0.299]])
    return np.matmul(img, m).clip(0, 255).astype(np.uint8)


def contrast(img, factor):
    mean = np.sum(np.mean(img, axis=(0, 1)) * np.array([0.114, 0.587, 0.299]))
    table = np.array([(el - mean) * factor + mean for el in range(256)]).clip(0, 255).astype(np.uint8)
    return table[img]


def brightness(img, factor):
    table = (np.arange(256, dtype=np.float32) * factor).clip(0, 255).astype(np.uint8)
    return table[img]


def _smooth(img):
    """OpenCV's ``filter2D(img, -1, (1 1 1; 1 5 1; 1 1 1) / 13)`` on uint8: float32 sums, reflected border."""
    k = np.ones((3, 3), dtype=np.float32)
    k[1, 1] = 5
    k /= 13
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="reflect").astype(np.float32)
    h, w = img.shape[:2]
    acc = np.zeros(img.shape, dtype=np.float32)
    for dy in range(3):
        for dx in range(3):
            acc += k[dy, dx] * p[dy:dy + h, dx:dx + w]
    return np.rint(acc).clip(0, 255).astype(np.uint8)


def sharpness(img, factor):
    if factor == 1.0:
        return img
    degenerate = _smooth(img)
    if factor == 0.0:
        return degenerate
    out = img.astype(np.float32)
    degenerate = degenerate.astype(np.float32)[1:-1, 1:-1, :]
    out[1:-1, 1:-1, :] = degenerate + factor * (out[1:-1, 1:-1, :] - degenerate)
    return out.astype(np.uint8)


def shear_x(img, factor, fill=REPLACE):
    return warp_affine(img, np.float32([[1, factor, 0], [0, 1, 0]]), fill)


def shear_y(img, factor, fill=REPLACE):
    return warp_affine(img, np.float32([[1, 0, 0], [factor, 1, 0]]), fill)


def translate_x(img, offset, fill=REPLACE):
    return warp_affine(img, np.float32([[1, 0, -offset], [0, 1, 0]]), fill)


def translate_y(img, offset, fill=REPLACE):
    return warp_affine(img, np.float32([[1, 0, 0], [0, 1, -offset]]), fill)


def posterize(img, bits):
    # BLIP's np.uint8(255 << (8 - bits)) wrapped to its low byte under numpy 1 (numpy 2 raises): the same mask
    return np.bitwise_and(img, np.uint8((255 << (8 - bits)) & 0xFF))


OPS = {"Identity": identity, "AutoContrast": autocontrast, "Equalize": equalize, "Rotate": rotate,
       "Solarize": solarize, "Color": color, "Contrast": contrast, "Brightness": brightness,
       "Sharpness": sharpness, "ShearX": shear_x, "TranslateX": translate_x, "TranslateY": translate_y,
       "Posterize": posterize, "ShearY": shear_y}


# ---- BLIP's level -> arguments, drawing signs from `rng` where BLIP draws from numpy's global state ----------------

def _args(name: str, level: float, rng) -> tuple:
    if name in ("Identity", "AutoContrast", "Equalize"):
        return ()
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return ((level / MAX_LEVEL) * 1.8 + 0.1,)
    if name in ("ShearX", "ShearY"):
        v = (level / MAX_LEVEL) * 0.3
        return (-v if rng.random() > 0.5 else v, REPLACE)
    if name in ("TranslateX", "TranslateY"):
        v = (level / MAX_LEVEL) * float(TRANSLATE_CONST)
        return (-v if rng.random() > 0.5 else v, REPLACE)
    if name == "Rotate":
        v = (level / MAX_LEVEL) * 30
        return (-v if rng.random() < 0.5 else v, REPLACE)
    if name == "Solarize":
        return (int((level / MAX_LEVEL) * 256),)
    return (int((level / MAX_LEVEL) * 4),)  # Posterize


class RandomAugment:
    """BLIP's ``RandomAugment(N, M, isPIL=True, augs)`` with its random draws taken from a given
    ``numpy.random.RandomState``; call it as ``aug(image, rng)`` on a PIL image or uint8 [H, W, 3] array."""

    def __init__(self, n: int = 2, m: float = 5, augs: Sequence[str] = BLIP_AUGS, pil_autocontrast: bool = False):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"RandomAugment: n must be an int >= 0, got {n!r}")
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m <= MAX_LEVEL:
            raise ValueError(f"RandomAugment: m must be a number in [0, {MAX_LEVEL}], got {m!r}")
        augs = tuple(augs) if augs else tuple(OPS)  # BLIP: an empty list means every operation
        unknown = [a for a in augs if a not in OPS]
        if unknown:
            raise ValueError(f"RandomAugment: augs has unknown operation(s) {unknown}; known: {sorted(OPS)}")
        self.n, self.m, self.augs, self.pil_autocontrast = n, m, augs, bool(pil_autocontrast)

    def __repr__(self):
        return f"RandomAugment(n={self.n}, m={self.m}, augs={list(self.augs)})"

    def sample(self, rng: np.random.RandomState) -> list:
        """The operations applied, ``[(name, args), ...]``, drawn from ``rng`` as BLIP draws them."""
        if not isinstance(rng, np.random.RandomState):
            raise TypeError(f"RandomAugment: rng must be a numpy.random.RandomState, got {type(rng).__name__}")
        applied = []
        for name in rng.choice(self.augs, self.n):
            if rng.random() > 0.5:
                continue
            applied.append((str(name), _args(str(name), self.m, rng)))
        return applied

    def apply(self, image, ops: list) -> np.ndarray:
        """``ops`` (from :meth:`sample`) applied in order to a PIL image or uint8 [H, W, 3] array."""
        img = np.array(image)  # BLIP: isPIL -> np.array(img); a copy, so the caller's array is never written
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"RandomAugment: image must be RGB uint8 [H, W, 3], got {img.dtype} {list(img.shape)}")
        for name, args in ops:
            img = autocontrast(img, pil=True) if name == "AutoContrast" and self.pil_autocontrast \
                else OPS[name](img, *args)
        return img

    def __call__(self, image, rng: np.random.RandomState) -> np.ndarray:
        return self.apply(image, self.sample(rng))
