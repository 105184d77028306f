"""blipfast.data.transforms and blipfast.data.randaugment against the references' own pipelines.

The references (Salesforce BLIP ``data/__init__.py`` and ``transform/randaugment.py``, LAVIS
``blip_processors.py``) run torchvision's RandomResizedCrop / RandomHorizontalFlip and BLIP's RandomAugment,
whose geometric operations are OpenCV's. OpenCV is no dependency, so: BLIP's numpy operations and its sampling
code are restated below (verbatim but for cv2.split / calcHist, done with numpy), and the OpenCV-based operations
are compared with outputs recorded from BLIP's own functions on OpenCV 4.10 (identical on 4.12).
"""
from __future__ import annotations

import base64
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from blipfast.data import randaugment as ra
from blipfast.data.transforms import (CLIP_MEAN, CLIP_STD, RECIPES, EvalTransform, TrainTransform, crop_params,
                                      to_normalized_tensor, view_seeds)

torchvision = pytest.importorskip("torchvision")
from torchvision import transforms as T  # noqa: E402
from torchvision.transforms import InterpolationMode  # noqa: E402

H, W = 7, 10
_y, _x, _c = np.meshgrid(np.arange(H), np.arange(W), np.arange(3), indexing="ij")
IMG = ((17 * _x + 29 * _y + 71 * _c + 5 * _x * _y * (_c + 1)) % 256).astype(np.uint8)

# BLIP's func_dict[name](IMG, arg, (128, 128, 128)) as OpenCV computes it (base64 of the uint8 [7, 10, 3] output)
RECORDED = [
    ("Rotate", 15.0,
        "gICAd36FZn6WXIawWZjWbJnhjYFIsG9v2F+2j3uNJ16WIWiwPIeXWqttetRen1RrxDh0km9bN65lW55yIWu0QI/ZYLdqgqRF"
        "p02EyU27qImMcZxuUz6Pflw6OoTNW6+9gNJAp32E0FCy1pAmK456W49bjm2CtrOxT5bYdcswns9syUy9UIdvL853WzyrkHBo"
        "x8fGQWSHb6ZbjeI+u2CRnW2iN7hxUHPCiGGMwHp0oGF/PIHGg6lHooVIxECeYY9xPaSKdUy0oIt3sImLlWNte3+D"),
    ("Rotate", -15.0,
        "anyOJ2+3NIDNPovARpOATJW/W5nYcZvAfZVWgYd2YYasS5jUXbKeasRcd7Qygcg/h6NxjVWPkJI0kMojaJ+ScsVRh+ZTmqFt"
        "q1mOujGexVS2zUZ3sUx70ky3fsMOm+ZStF+NzE/CoGmv7YY1YZtyka5iR4paLMFmp6ZFxi+UumCyaI+GGrBZN76JRUWkV5hi"
        "Zy+5ck4Ztox6bmtYPKZZOKaEV4K0b0WtiGR0n4hyppqPrKWegICAfIB7Z5d3bGuqiGSBsqGX0GlsrZesaYusUWJz"),
    ("Rotate", 7.3,
        "T2yJSW+VSHalSoK5UZHSXqPmd5uJkZs0rJxcpo5/EVmhKXO9QZCnXbE9d9JElKFYsR18ukZ0iHGKgpCTLXa+SZrOZ8Bkhr9M"
        "pTOBxkG8yXGwpJpAM3R1W4RISJDPab2Gi99Qr1qS01TI6YwfIKZqSbd9ckCqm4BmY6iPh987rn6E1ljSLpNUK9R+Vya8g11J"
        "sqaabn6Nfroeo5dWz1GyZoR4Mc95W0rajGhuvoV+pqnCQnuzk8ZBvmF0gmdwN7RfVHK5iV6EtKeazVpldVp2Yoit"),
    ("ShearX", 0.15,
        "AEeOEVifImmwM3rBRIvSVZzjZq30d74FiM8WmeAnLGikMHvGRpbmXLEucswmiOdGnipmtB2Gyjim4FPGUIGyTZroaL9ng+RG"
        "nll1uS6k1FPT73hSWp0xJcJgaZG5abh4iedGqYaEyUXC6XRweaM+KdJ8SXG6aTBoe5hNg9IhqKNuzUS7in2gF7ZVPIeiYSiH"
        "hmE8q5qJhJZonKk2xiySsG+uGrJKRLWmbjjCmHtewr66rMHWhIt6suRGyUmZEJYcP8uHbjDanX1dzLKw4xczKmSe"),
    ("ShearX", -0.15,
        "AEeOEVifImmwM3rBRIvSVZzjZq30d74FiM8WmeAnIGiwNoPQTJ7IYrkQeNQwjsdQpApwuiWQ0ECw1F2/Qo3XXbK2eNc1k6xk"
        "riGTyUbC5Guhr5AgGrVPR7Z0ZbOQheI+paF8xUC65W+IlZ42Jc10RYyyZSuAe19Dit0wr3591E/KYYh/HsFkQ2KxaDNmjWxL"
        "sqWYmpiWsUpk203ARZBcL9N4WVbUg1lwrZyM19/oQWKEY2132VOdIIggN9VzZjrelW9hxLy08yE3OlaKUaP1fISM"),
    ("ShearY", 0.15,
        "AEeOIl6aP3ChVX2laIShdYeZfoSLgICAgICAgICAHWSrLnnEPYvZTJtbWKeOY7C9bJ3neLoNh8AqkL9GOoHIUKDwZLxkeNY1"
        "iYRPmb9lpw52syuDwFiPyoaTV57lcsdEi+1PpIF/ujGoz06NymfV834ZNZVUbKWPdLsClO5Ism6K0EzJg3aZxZ01HahkQ+GP"
        "SjK5XnQzkdgftj102U/FbIeDHLtaO6ydWBnDc1Qlj29+qJN/rvU82DygUIBQKMJdTZizcTvFk3JSs6eb1NzjSmJ7"),
    ("ShearY", -0.15,
        "AEeOFl6mLnjCRpRxYbRvftdxmxZ4uyeDqlCXpICrHWSrOIXSVamtcs8rkmFgtGaZ1lfX64oZH41cRp9POoHIWqzWfNo4npp1"
        "wz656nVBKbBmO92PZCrBkG5LV57lfNMqo7tzykW/XIN6YMRpTCHFe1AlqZeGgo2XdLsCntJWyjyuhoCZJchrVlPRh2JUu6Ob"
        "vtTrJFyTkdgfwCGCoW2ZIrtTVnXEjGJ5wruz8BcuN2SQZJzTrvU8zkyhMIo0WbR+d12qhn51h4aGgICAgICAgICA"),
    ("TranslateX", 2.5,
        "K3K5PIPKTZTbXqXsb7Z9gMcOkdgfjbBUgICAgICAVKh7asMbgN47lnlbrBR7wi+b2Eq7smymgICAgICAft4+mYNttCicz03L"
        "6nJ6hZcpILxYV6d4gICAgICAp5SAx0O+53J8h6E6J9B4R3+2Zy50fGNKgICAgICA0UrDdoOQG7xdQHWqZS53imdEr6CRoZ6c"
        "gICAgICAeoCFJMNhToa9eEmZoox1zM/RdpKtRlpugICAgICAJLZIU4OzglCesZ2J4Gp0jzdfPoTKa5XAgICAgICA"),
    ("TranslateY", -3.7,
        "gICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICA"
        "gICAgICAgICAgICAgICAgICAWG6EXXSKY3mPaH6UbYOac4mfeI6kfZNag5lfiJ5kCVCXHGStLnjCQYyIU6GeZrW0eHnJi40v"
        "nqFFsLVaJm20PovZVamtbccihJZHnLRssyKQy0Blk16KqnyuQ4rRYLK1fNo4mbJstSug0lOEnnu3u6M7KHtvRKNS"),
    ("Sharpness", 0.1,
        "AEeOEVifImmwM3rBRIvSVZzjZq30d74FiM8WmeAnHWSrM3+5SZq1X6NSdaxgi6OAoU19pVZ5qXF141fLOoHIVabBcLlbi7pn"
        "plxyr12PuHGar3JYWYVjLc5vV57ld7tYl8ZzpWCNs2ynr3diXpRrWp+FaV2Nd0UTdLsCmb5hrGKKrXizT41rUKKDZFiad21k"
        "ioN8wby3kdgfqWJpr3ChRI9oS66PY1y1jWpqpYmRq6i3CzNbrvU83UKnDI8SO9x9ainomXZTyMO+9xApJl2UVar/"),
    ("Sharpness", 1.9,
        "AEeOEVifImmwM3rBRIvSVZzjZq30d74FiM8WmeAnHWSrM3/dSZogX8fEdfP2izIVob9Zyeyd8Abg41fLOoHIVaYscN3xiyVD"
        "ps6W0xbW/00pPpbKy8wcLc5vV57ld9/ulzFPyfax+kgSPpvU0NtHEy6pRc8cd0UTdLsCmSk90PiuGFQewbEACQ2DQMoFdybW"
        "roNYwby3kdgfzdSNGkwM2rP+JxmPY/IgjWojydC1FjdGCzNbrvU83UKnDI8SO9x9ainomXZTyMO+9xApJl2UVar/"),
    ("Sharpness", 0.0,
        "F1+oIWqzNICkR5WUW6uFbpmdgYehlXZXqItbspZmJ3C6M3+3SZqwX6Fadalmi5yGoVV/o1x3pndwnoaBRpK2Vaa8cLdhi7Vp"
        "pmRwrWGMtXOTqHBgYYJnXIKBZrSfd7lel8F1o2aLsG6iqHVqZpFtXpiDa2WGaGpZha45mbljqmiIqHquV4txVJ2DZmCVd3Fs"
        "iIN+nI6npKhJp2pnqnKcSo1uTamPY2KwjWpuo4aPpqGwWneTtZJbumt/XHhZTq2CU2yrgHmFrYabxmx1aXmebaHV"),
    ("Sharpness", 0.46,
        "AEeOEVifImmwM3rBRIvSVZzjZq30d74FiM8WmeAnHWSrM3/ASZrLX6o1dbpKi8BqoTB1rECAt1uL41fLOoHIVabXcMBFi9Bf"
        "pj95tk+dxmm3zHk7PJNVLc5vV57ld8JCl9xrrEqUwWS9zH5FQaJjTLyMYUCqd0UTdLsCmdRZs0yRw3DJMpRVQriDXDuwd19H"
        "kYN0wby3kdgfsEVwxWi3LpZSQ8SPY0bLjWpcrJeYwcXUCzNbrvU83UKnDI8SO9x9ainomXZTyMO+9xApJl2UVar/"),
]
# cv2.warpAffine(IMG, [[0.9, 0.2, 1.3], [-0.1, 1.1, -0.7]], (10, 7), borderValue=(128, 64, 32), flags=INTER_LINEAR)
RECORDED_AFFINE = (
    "gEAgRU1kIWqzO4jWV6tCc80oj9pUrRiAwUJujW2MgEAgY1FVOYTOV6umd9VKmGdruTimyWPP0pUvJ4JpgEAgeUk2TpjHcclu"
    "l7dmvVGs5G1xYadKM9GEXUG6gEAggEAgY6qNi9dAtXuSqmKySaJjSH+ZZTZsk3ZZgEAggEAgfK4NoaxW0ES4ZY2AMLmBYVO0"
    "k3Vvx8bFgEAggEAgjaIit1lro2KSLLRYU4G+i2KJwJqSwztWgEAggEAgk40svotqZGY/SphJbkmDiVVBmnBanjQk"
)


def _decode(b64):
    return np.frombuffer(base64.b64decode(b64), dtype=np.uint8).reshape(H, W, 3)


@pytest.mark.parametrize("name,arg,b64", RECORDED, ids=[f"{n}({a})" for n, a, _ in RECORDED])
def test_opencv_operations_match_opencv_recordings(name, arg, b64):
    args = (arg,) if name == "Sharpness" else (arg, (128, 128, 128))
    out = ra.OPS[name](IMG.copy(), *args)
    ref = _decode(b64)
    assert out.dtype == np.uint8 and out.shape == ref.shape
    diff = np.abs(out.astype(int) - ref.astype(int))
    assert not diff.any(), f"{int((diff > 0).sum())} pixels differ, by up to {diff.max()}"


def test_warp_affine_matches_opencv_recording_with_a_general_matrix():
    out = ra.warp_affine(IMG, [[0.9, 0.2, 1.3], [-0.1, 1.1, -0.7]], fill=(128, 64, 32))
    assert np.array_equal(out, _decode(RECORDED_AFFINE))


def test_integer_translations_are_shifts_filled_with_grey():
    img = np.random.randint(0, 256, (13, 17, 3), dtype=np.uint8)
    out = ra.OPS["TranslateX"](img, 5.0, (128, 128, 128))  # output (x, y) reads input (x + 5, y)
    assert np.array_equal(out[:, :12], img[:, 5:]) and (out[:, 12:] == 128).all()
    out = ra.OPS["TranslateY"](img, -5.0, (128, 128, 128))
    assert np.array_equal(out[5:], img[:8]) and (out[:5] == 128).all()
    assert np.array_equal(ra.OPS["Rotate"](img, 0.0, (128, 128, 128)), img)
    assert np.array_equal(ra.OPS["ShearX"](img, 0.0, (128, 128, 128)), img)


# ---- BLIP's numpy operations, restated (cv2.split -> channel slices, cv2.calcHist -> np.bincount) ----------------

def blip_autocontrast_func(img, cutoff=0):
    n_bins = 256

    def tune_channel(ch):
        high, low = ch.max(), ch.min()  # numpy uint8 scalars, as cv2.split gives them
        if high <= low:
            table = np.arange(n_bins)
        else:
            scale = (n_bins - 1) / (high - low)
            with np.errstate(over="ignore"):
                offset = -low * scale
            table = np.arange(n_bins) * scale + offset
            table[table < 0] = 0
            table[table > n_bins - 1] = n_bins - 1
        table = table.clip(0, 255).astype(np.uint8)
        return table[ch]

    return np.stack([tune_channel(img[..., k]) for k in range(3)], axis=-1)


def blip_equalize_func(img):
    n_bins = 256

    def tune_channel(ch):
        hist = np.bincount(ch.reshape(-1), minlength=256).astype(np.float32)
        non_zero_hist = hist[hist != 0].reshape(-1)
        step = np.sum(non_zero_hist[:-1]) // (n_bins - 1)
        if step == 0:
            return ch
        n = np.empty_like(hist)
        n[0] = step // 2
        n[1:] = hist[:-1]
        table = (np.cumsum(n) // step).clip(0, 255).astype(np.uint8)
        return table[ch]

    return np.stack([tune_channel(img[..., k]) for k in range(3)], axis=-1)


def blip_solarize_func(img, thresh=128):
    table = np.array([el if el < thresh else 255 - el for el in range(256)])
    return table.clip(0, 255).astype(np.uint8)[img]


def blip_color_func(img, factor):
    M = (np.float32([[0.886, -0.114, -0.114], [-0.587, 0.413, -0.587], [-0.299, -0.299, 0.701]]) * factor
         + np.float32([[0.114], [0.587], [0.299]]))
    return np.matmul(img, M).clip(0, 255).astype(np.uint8)


def blip_contrast_func(img, factor):
    mean = np.sum(np.mean(img, axis=(0, 1)) * np.array([0.114, 0.587, 0.299]))
    return np.array([(el - mean) * factor + mean for el in range(256)]).clip(0, 255).astype(np.uint8)[img]


def blip_brightness_func(img, factor):
    return (np.arange(256, dtype=np.float32) * factor).clip(0, 255).astype(np.uint8)[img]


def blip_posterize_func(img, bits):
    return np.bitwise_and(img, np.uint8((255 << (8 - bits)) & 255))  # numpy 1 wrapped the mask to a byte


BLIP_NUMPY_OPS = {"AutoContrast": blip_autocontrast_func, "Equalize": blip_equalize_func,
                  "Solarize": blip_solarize_func, "Color": blip_color_func, "Contrast": blip_contrast_func,
                  "Brightness": blip_brightness_func, "Posterize": blip_posterize_func}


@pytest.mark.parametrize("name", sorted(BLIP_NUMPY_OPS))
def test_numpy_operations_match_blip(name):
    rng = np.random.default_rng(torch.randint(2**31, ()).item())
    for t in range(12):
        h, w = rng.integers(1, 30, 2)
        low = int(rng.integers(0, 40)) if t % 3 else 0
        img = rng.integers(low, int(rng.integers(low, 256)) + 1, (h, w, 3), dtype=np.uint8)
        level = float(rng.integers(0, 11))
        np.random.seed(t)
        args = _blip_args(name, level)
        assert np.array_equal(ra.OPS[name](img.copy(), *args), BLIP_NUMPY_OPS[name](img.copy(), *args)), (name, t)


def test_autocontrast_keeps_blips_uint8_wrap():
    img = np.zeros((4, 5, 3), dtype=np.uint8)
    img[..., 0] = np.arange(20).reshape(4, 5) + 10  # min 10 > 0: BLIP's offset wraps, the channel saturates
    img[..., 1] = np.arange(20).reshape(4, 5) * 5  # min 0: stretched to [0, 255]
    img[..., 2] = 7  # constant: unchanged
    out = ra.OPS["AutoContrast"](img)
    assert (out[..., 0] == 255).all()
    assert out[..., 1].min() == 0 and out[..., 1].max() == 255
    assert (out[..., 2] == 7).all()
    from PIL import ImageOps

    aug = ra.RandomAugment(1, 5, augs=["AutoContrast"], pil_autocontrast=True)
    pil = np.asarray(ImageOps.autocontrast(Image.fromarray(img)))
    assert np.array_equal(aug.apply(img, [("AutoContrast", ())]), pil) and not np.array_equal(out, pil)


def test_enhance_operations_are_the_identity_at_the_references_magnitude():
    img = np.random.randint(0, 256, (9, 11, 3), dtype=np.uint8)
    for name in ("Brightness", "Sharpness"):
        (factor,) = _blip_args(name, 5)
        assert factor == 1.0 and np.array_equal(ra.OPS[name](img, factor), img)


# ---- BLIP's RandomAugment sampling, restated (level_to_args and __call__, numpy's global generator) -------------

def _blip_args(name, level):
    MAX_LEVEL, translate_const, replace_value = 10, 10, (128, 128, 128)
    if name in ("Identity", "AutoContrast", "Equalize"):
        return ()
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return ((level / MAX_LEVEL) * 1.8 + 0.1,)
    if name in ("ShearX", "ShearY"):
        level = (level / MAX_LEVEL) * 0.3
        if np.random.random() > 0.5:
            level = -level
        return (level, replace_value)
    if name in ("TranslateX", "TranslateY"):
        level = (level / MAX_LEVEL) * float(translate_const)
        if np.random.random() > 0.5:
            level = -level
        return (level, replace_value)
    if name == "Rotate":
        level = (level / MAX_LEVEL) * 30
        if np.random.random() < 0.5:
            level = -level
        return (level, replace_value)
    if name == "Solarize":
        return (int((level / MAX_LEVEL) * 256),)
    return (int((level / MAX_LEVEL) * 4),)


class BlipRandomAugment:
    """BLIP's RandomAugment: its get_random_ops and __call__, with blipfast's operations (recorded above)."""

    def __init__(self, N=2, M=10, isPIL=False, augs=()):
        self.N, self.M, self.isPIL = N, M, isPIL
        self.augs = list(augs) if augs else list(ra.OPS)
        self.applied = []

    def get_random_ops(self):
        sampled_ops = np.random.choice(self.augs, self.N)
        return [(op, 0.5, self.M) for op in sampled_ops]

    def __call__(self, img):
        if self.isPIL:
            img = np.array(img)
        ops = self.get_random_ops()
        for name, prob, level in ops:
            if np.random.random() > prob:
                continue
            args = _blip_args(name, level)
            self.applied.append((str(name), args))
            img = ra.OPS[name](img, *args)
        return img


def test_sampling_draws_what_blips_draws():
    ref = BlipRandomAugment(2, 5, isPIL=True, augs=list(ra.BLIP_AUGS))
    aug = ra.RandomAugment(2, 5)
    img = np.random.randint(0, 256, (6, 7, 3), dtype=np.uint8)
    counts = {}
    for s in range(300):
        ref.applied = []
        np.random.seed(s)
        expect = ref(img)
        ops = aug.sample(np.random.RandomState(s))
        assert ops == ref.applied, s
        assert np.array_equal(aug.apply(img, ops), expect)
        for name, _ in ops:
            counts[name] = counts.get(name, 0) + 1
    # every operation is drawn (2 draws x 1/10 each x 1/2 applied: ~30 of each in 300 samples)
    assert set(counts) == set(ra.BLIP_AUGS) and min(counts.values()) >= 10


# ---- the whole pipeline against torchvision + BLIP's RandomAugment, seeded alike ---------------------------------

def _reference_pipeline(recipe, size):
    r = RECIPES[recipe]
    steps = [T.RandomResizedCrop(size, scale=(r.min_scale, 1.0), interpolation=InterpolationMode.BICUBIC),
             T.RandomHorizontalFlip()]
    if r.randaugment:
        steps.append(BlipRandomAugment(2, 5, isPIL=True, augs=list(ra.BLIP_AUGS)))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_pipeline_matches_the_reference_tensor_for_tensor(recipe):
    size, seed, epoch = 24, int(torch.randint(2**31, ()).item()), 3
    ref = _reference_pipeline(recipe, size)
    mine = TrainTransform(recipe, size, seed)
    shapes = [(40, 50), (50, 37), (3, 90), (90, 4), (24, 24), (1, 1)]  # (h, w); thin ones take the central crop
    for index, (h, w) in enumerate(shapes):
        img = Image.fromarray(np.random.randint(0, 256, (h, w, 3), dtype=np.uint8))
        ts, ns = view_seeds(seed, epoch, index)
        torch.manual_seed(ts)
        np.random.seed(ns)
        expect = ref(img)
        out = mine(img, epoch, index)
        assert out.dtype == torch.float32 and out.shape == (3, size, size)
        assert torch.equal(out, expect), (recipe, h, w)


def test_crop_params_draw_as_torchvision():
    for s in range(200):
        h, w = (int(v) for v in np.random.randint(1, 200, 2))
        scale = (0.2, 1.0) if s % 2 else (0.5, 1.0)
        torch.manual_seed(s)
        expect = T.RandomResizedCrop.get_params(torch.empty(3, h, w), list(scale), [3 / 4, 4 / 3])
        assert crop_params(w, h, scale, torch.Generator().manual_seed(s)) == expect


def test_crop_scale_distribution_follows_the_recipe():
    t = TrainTransform("blip-pretrain", 16, seed=5)
    areas = np.array([np.prod(t.draw(0, i, 400, 400)["crop"][2:]) / 400 ** 2 for i in range(400)])
    assert areas.min() >= 0.19 and areas.max() <= 1.0
    assert 0.5 < areas.mean() < 0.7  # uniform on [0.2, 1] (clipped to the image): mean ~0.6
    flips = np.mean([t.draw(0, i, 400, 400)["flip"] for i in range(400)])
    assert 0.4 < flips < 0.6


# ---- determinism, pickling, workers, no global generator --------------------------------------------------------

def test_same_seed_epoch_index_same_tensor_and_no_global_draws():
    img = Image.fromarray(np.random.randint(0, 256, (33, 41, 3), dtype=np.uint8))
    t = TrainTransform("blip-finetune", 20, seed=11)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    a = t(img, 2, 7)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(x, y) for x, y in zip(np.random.get_state(), np_state))
    torch.manual_seed(999)
    np.random.seed(999)
    assert torch.equal(t(img, 2, 7), a)
    assert torch.equal(pickle.loads(pickle.dumps(t))(img, 2, 7), a)
    draws = {repr(t.draw(e, i, 41, 33)) for e in range(3) for i in range(10)}
    assert len(draws) == 30  # every (epoch, index) its own draw
    assert repr(TrainTransform("blip-finetune", 20, seed=12).draw(2, 7, 41, 33)) != repr(t.draw(2, 7, 41, 33))
    assert view_seeds(1, 2, 3) == view_seeds(1, 2, 3) != view_seeds(1, 3, 2)


class _Images(torch.utils.data.Dataset):
    def __init__(self, transform):
        self.transform = transform
        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 256, (20 + i, 30 - i, 3), dtype=np.uint8)) for i in range(6)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i], 1, i)


def test_loader_workers_draw_what_the_main_process_draws():
    ds = _Images(TrainTransform("blip_image_train", 12, seed=3))
    inline = torch.stack([ds[i] for i in range(len(ds))])
    loaded = torch.cat(list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)))
    assert torch.equal(loaded, inline)


# ---- evaluation transform, tensors, errors ------------------------------------------------------------------------

def test_eval_transform_is_the_references_resize_and_normalise_without_torchvision(monkeypatch):
    import sys

    img = Image.fromarray(np.random.randint(0, 256, (31, 45, 3), dtype=np.uint8))
    ref = T.Compose([T.Resize((16, 16), interpolation=InterpolationMode.BICUBIC), T.ToTensor(),
                     T.Normalize(CLIP_MEAN, CLIP_STD)])(img)
    for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
        monkeypatch.setitem(sys.modules, name, None)  # from here on, importing torchvision fails
    assert torch.equal(EvalTransform(size=16)(img), ref)
    assert torch.equal(pickle.loads(pickle.dumps(EvalTransform(size=16)))(img.convert("RGBA"), 3, 4), ref)
    t = TrainTransform("blip2_image_train", 16, seed=0)  # built and drawn without torchvision; applying needs it
    assert t.draw(0, 0, 45, 31)["ops"] == []
    with pytest.raises(ImportError):
        t(img, 0, 0)


def test_to_normalized_tensor_is_totensor_then_normalize():
    arr = np.random.randint(0, 256, (5, 6, 3), dtype=np.uint8)
    ref = T.Normalize((0.1, 0.2, 0.3), (0.5, 0.6, 0.7))(T.ToTensor()(arr))
    assert torch.equal(to_normalized_tensor(arr, (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)), ref)
    assert torch.equal(to_normalized_tensor(Image.fromarray(arr)), T.Normalize(CLIP_MEAN, CLIP_STD)(T.ToTensor()(arr)))


def test_bad_arguments_are_named():
    img = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="recipe"):
        TrainTransform("simclr", 8, 0)
    with pytest.raises(ValueError, match="size"):
        TrainTransform("blip-pretrain", 0, 0)
    with pytest.raises(ValueError, match="seed"):
        TrainTransform("blip-pretrain", 8, -1)
    with pytest.raises(ValueError, match="std"):
        TrainTransform("blip-pretrain", 8, 0, std=(0.2, 0.0, 0.2))
    t = TrainTransform("blip-pretrain", 8, 0)
    with pytest.raises(ValueError, match="epoch"):
        t(img, -1, 0)
    with pytest.raises(ValueError, match="index"):
        t(img, 0, 1.5)
    with pytest.raises(TypeError, match="PIL"):
        t(np.zeros((8, 8, 3), dtype=np.uint8), 0, 0)
    with pytest.raises(ValueError, match="augs"):
        ra.RandomAugment(2, 5, augs=["Cutout"])
    with pytest.raises(ValueError, match="m must"):
        ra.RandomAugment(2, 11)
    with pytest.raises(ValueError, match="RGB uint8"):
        ra.RandomAugment().apply(np.zeros((4, 4), dtype=np.uint8), [])
    with pytest.raises(TypeError, match="RandomState"):
        ra.RandomAugment().sample(np.random.default_rng(0))
    with pytest.raises(ValueError, match="size"):
        EvalTransform()
    with pytest.raises(ValueError, match="mean"):
        EvalTransform(8, mean=(0.5, 0.5))


def test_eval_transform_with_a_processor_is_that_processors_output():
    from blipfast.data.vision import default_blip_processor, preprocess

    img = Image.fromarray(np.random.randint(0, 256, (19, 23, 3), dtype=np.uint8))
    proc = default_blip_processor(12)
    assert torch.equal(EvalTransform(processor=proc)(img), preprocess(proc, img))


def test_loaded_processors_resize_with_pil_as_the_references(tmp_path):
    """A folder's processor is read on transformers' PIL backend, also with torchvision installed (whose default
    backend resizes tensors and gives other pixels): the pixels are BLIP's Resize(bicubic) on the PIL image."""
    from transformers import BlipImageProcessor

    from blipfast.data.vision import load_image_processor, preprocess

    BlipImageProcessor(size={"height": 12, "width": 12}).save_pretrained(tmp_path)
    proc = load_image_processor(tmp_path)
    assert "Pil" in type(proc).__name__
    img = Image.fromarray(np.random.randint(0, 256, (19, 23, 3), dtype=np.uint8))
    want = T.Compose([T.Resize((12, 12), interpolation=InterpolationMode.BICUBIC), T.ToTensor(),
                      T.Normalize(CLIP_MEAN, CLIP_STD)])(img)
    torch.testing.assert_close(preprocess(proc, img), want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="--vision: .* no usable image processor"):
        load_image_processor(tmp_path / "nowhere", where="--vision")


def test_train_transform_takes_the_processors_size_mean_and_std():
    """train_transform(recipe, processor, seed): the training recipe's transform (blip2-stage1 -> LAVIS'
    blip2_image_train) at the processor's square size (a dict or transformers' SizeDict) and its statistics; a
    processor that does not resize to a square, an unknown recipe, and a StreamAugment of something else refused."""
    from transformers import BlipImageProcessor

    from blipfast.data.transforms import StreamAugment, train_transform

    proc = BlipImageProcessor(size={"height": 20, "width": 20}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4])
    t = train_transform("blip2-stage1", proc, seed=3)
    assert (t.recipe, t.size, t.seed, t.mean, t.std) == ("blip2_image_train", 20, 3, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4))
    assert train_transform("blip-pretrain", proc, seed=0).randaugment is not None
    with pytest.raises(ValueError, match="square"):
        train_transform("blip-finetune", BlipImageProcessor(size={"height": 20, "width": 24}), seed=0)
    with pytest.raises(ValueError, match="no train transform"):
        train_transform("blip2-finetune-ish", proc, seed=0)
    with pytest.raises(TypeError, match="TrainTransform"):
        StreamAugment(proc)
    a, b = StreamAugment.index("k", (0, 1, 2)), StreamAugment.index("k", (0, 1, 3))
    assert a != b and a == StreamAugment.index("other", (0, 1, 2)) and 0 <= a < 2 ** 63
