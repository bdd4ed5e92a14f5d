"""instdisc/data/transforms.py: the PIL training recipe, the eval resize, TwoView."""
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from instdisc.data.transforms import JITTER, TwoView, eval_transform, jitter_strengths, train_transform

FOLDER = SimpleNamespace(channels=3, image_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                         array=None, native_size=None)
FMNIST = SimpleNamespace(channels=1, image_size=28, mean=(0.2860,), std=(0.3530,),
                         array=torch.zeros(1, 1, 28, 28, dtype=torch.uint8), native_size=28)


def rgb_image(w=50, h=40, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def gray_image(seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8))


def step_types(t):
    return [type(s) for s in t.transforms]


def test_train_recipe_rgb():
    t = train_transform(FOLDER)
    assert step_types(t) == [T.RandomResizedCrop, T.ColorJitter, T.RandomGrayscale, T.RandomHorizontalFlip,
                             T.ToTensor, T.Normalize]
    crop, jitter = t.transforms[0], t.transforms[1]
    assert crop.size == (32, 32) and crop.scale == (0.2, 1.0)
    assert jitter.brightness == (0.6, 1.4) and jitter.hue == (-0.4, 0.4) and t.transforms[2].p == 0.2
    torch.manual_seed(0)
    x = t(rgb_image())
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_train_recipe_grayscale_has_no_colour_ops():
    t = train_transform(FMNIST)
    assert step_types(t) == [T.RandomResizedCrop, T.ColorJitter, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    jitter = t.transforms[1]
    assert jitter.saturation is None and jitter.hue is None and jitter.contrast == (0.6, 1.4)
    torch.manual_seed(0)
    assert t(gray_image()).shape == (1, 28, 28)


def test_jitter_strength():
    assert jitter_strengths() == {"brightness": JITTER, "contrast": JITTER, "saturation": JITTER, "hue": JITTER}
    assert jitter_strengths(0.8) == {"brightness": 0.8, "contrast": 0.8, "saturation": 0.8, "hue": 0.5}
    rgb, gray = train_transform(FOLDER, jitter=0.8).transforms[1], train_transform(FMNIST, jitter=0.8).transforms[1]
    assert rgb.brightness == pytest.approx((0.2, 1.8)) == rgb.saturation and rgb.hue == (-0.5, 0.5)
    assert gray.contrast == pytest.approx((0.2, 1.8)) and gray.hue is None


def test_eval_in_memory_is_plain_normalisation():
    img = gray_image()
    x = eval_transform(FMNIST)(img)
    expected = (torch.from_numpy(np.array(img)).float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(x[0], expected, atol=1e-6)
    bigger = SimpleNamespace(**dict(vars(FMNIST), image_size=32))
    assert eval_transform(bigger)(img).shape == (1, 32, 32)


def test_eval_files_resize_then_centre_crop():
    t = eval_transform(SimpleNamespace(**dict(vars(FOLDER), image_size=224)))
    assert step_types(t) == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    assert t.transforms[0].size == 256 and t.transforms[1].size == (224, 224)
    assert t(rgb_image(300, 200)).shape == (3, 224, 224)
    small = eval_transform(FOLDER)
    assert small.transforms[0].size == int(32 * 256 / 224) and small(rgb_image(5, 9)).shape == (3, 32, 32)


def test_eval_is_deterministic_and_train_is_not():
    img = rgb_image()
    e = eval_transform(FOLDER)
    assert torch.equal(e(img), e(img))
    torch.manual_seed(0)
    v1, v2 = TwoView(train_transform(FOLDER))(img)
    assert v1.shape == v2.shape == (3, 32, 32) and not torch.equal(v1, v2)


def test_two_view_calls_twice_and_pickles():
    calls = []

    class Count:
        def __call__(self, img):
            calls.append(img)
            return len(calls)

    assert TwoView(Count())("img") == (1, 2) and calls == ["img", "img"]
    t = pickle.loads(pickle.dumps(TwoView(train_transform(FOLDER))))
    assert isinstance(t, TwoView) and "RandomResizedCrop" in repr(t)
