"""PIL-image transforms: the InstDisc training recipe and the evaluation resize. Covered by
tests/test_data_transforms.py.

The training recipe (Wu et al. 2018, as in lemniscate.pytorch), sized to ``ds.image_size``:
RandomResizedCrop(scale=(0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.4) (grayscale data: brightness and contrast only),
RandomGrayscale(0.2) (RGB only), RandomHorizontalFlip, ToTensor, Normalize(ds.mean, ds.std).
:mod:`instdisc.data.batch_aug` applies the same recipe to whole uint8 batches.

Every transform here is a picklable object (no lambdas), so datasets carrying them work with DataLoader workers.
"""
from __future__ import annotations

from typing import Callable

from torchvision import transforms as T

__all__ = ["train_transform", "eval_transform", "TwoView", "CROP_SCALE", "JITTER", "jitter_strengths", "GRAYSCALE_P", "EVAL_RESIZE_RATIO"]

CROP_SCALE = (0.2, 1.0)
JITTER = 0.4  # brightness, contrast, saturation and hue strength
GRAYSCALE_P = 0.2
EVAL_RESIZE_RATIO = 256 / 224  # file datasets: resize the short side to size * 256/224, then centre-crop


def jitter_strengths(jitter: float = JITTER) -> dict:
    """ColorJitter's four strengths for one ``--jitter`` value: brightness, contrast and saturation ``jitter``, hue
    ``min(jitter, 0.5)`` (hue's bound); gray data uses only the first two."""
    j = float(jitter)
    return {"brightness": j, "contrast": j, "saturation": j, "hue": min(j, 0.5)}


def _normalize(ds) -> list:
    return [T.ToTensor(), T.Normalize(ds.mean, ds.std)]


def train_transform(ds, *, scale: tuple[float, float] = CROP_SCALE, jitter: float = JITTER) -> Callable:
    """PIL image -> float tensor C x S x S (S = ds.image_size), randomly augmented (crop area fraction in ``scale``,
    colour jitter of strength ``jitter``: :func:`jitter_strengths`)."""
    size = ds.image_size
    steps: list = [T.RandomResizedCrop(size, scale=tuple(scale))]
    js = jitter_strengths(jitter)
    if ds.channels == 3:
        steps += [T.ColorJitter(**js), T.RandomGrayscale(p=GRAYSCALE_P)]
    else:
        steps += [T.ColorJitter(js["brightness"], js["contrast"])]
    steps += [T.RandomHorizontalFlip()]
    return T.Compose(steps + _normalize(ds))


def eval_transform(ds) -> Callable:
    """PIL image -> float tensor C x S x S, deterministic.

    In-memory datasets (small, square, one size): used as they are, resized only when ``ds.image_size`` differs
    from the stored size. File datasets: Resize(int(S * 256/224)) then CenterCrop(S).
    """
    size = ds.image_size
    native = getattr(ds, "native_size", None)
    crop = getattr(ds, "eval_crop", None)
    if getattr(ds, "array", None) is not None and native is not None and crop:  # image caches
        steps = [T.CenterCrop(max(1, round(native * crop))), T.Resize(size)]
    elif getattr(ds, "array", None) is not None and native is not None:
        steps = [] if native == size else [T.Resize(size)]
    else:
        steps = [T.Resize(int(size * EVAL_RESIZE_RATIO)), T.CenterCrop(size)]
    return T.Compose(steps + _normalize(ds))


class TwoView:
    """Apply ``t`` twice to the same image: ``(t(img), t(img))`` (two independent random views)."""

    def __init__(self, t: Callable):
        self.t = t

    def __call__(self, img):
        return self.t(img), self.t(img)

    def __repr__(self) -> str:
        return f"TwoView({self.t!r})"
