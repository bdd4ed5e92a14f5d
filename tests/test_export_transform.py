"""instdisc.export.transform: the eval transform rebuilt from metadata matches the training-time eval path."""
import numpy as np
import pytest
import torch
from PIL import Image

from instdisc.data import batch_eval, build_dataset
from instdisc.errors import InstdiscError
from instdisc.export.transform import EncoderTransform


def test_native_matches_batch_eval(fake_mnist):
    ds = build_dataset("fashion-mnist:test", data_root=str(fake_mnist))
    t = EncoderTransform(channels=1, image_size=28, mean=ds.mean, std=ds.std, resize="native")
    ref = batch_eval(ds.array[:5], ds)  # (5, 1, 28, 28)
    got = torch.stack([t(ds.load_image(i)) for i in range(5)])
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_other_sizes_and_modes_become_s_by_s():
    t = EncoderTransform(channels=3, image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3, resize="crop")
    img = Image.fromarray(np.full((40, 30), 128, dtype=np.uint8), "L")  # grayscale, not square
    x = t(img)
    assert x.shape == (3, 16, 16)
    torch.testing.assert_close(x, torch.full_like(x, (128 / 255 - 0.5) / 0.25))
    t1 = EncoderTransform(channels=1, image_size=28, mean=(0.5,), std=(0.5,), resize="native")
    assert t1(Image.new("RGB", (56, 70))).shape == (1, 28, 28)


def test_validation():
    with pytest.raises(InstdiscError, match="channels"):
        EncoderTransform(channels=3, image_size=8, mean=(0.5,), std=(0.5,))
    with pytest.raises(InstdiscError, match="resize"):
        EncoderTransform(channels=1, image_size=8, mean=(0.5,), std=(0.5,), resize="stretch")
