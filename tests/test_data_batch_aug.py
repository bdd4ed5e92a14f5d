"""instdisc/data/batch_aug.py: the InstDisc recipe on uint8 batches."""
import math
from types import SimpleNamespace

import pytest
import torch
from torchvision.transforms import functional as TF

from instdisc.data import batch_aug as ba
from instdisc.data.batch_aug import BatchAugment, batch_eval

RGB = SimpleNamespace(channels=3, image_size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
GRAY = SimpleNamespace(channels=1, image_size=28, mean=(0.2860,), std=(0.3530,))
OFF = dict(scale=(1.0, 1.0), brightness=0, contrast=0, saturation=0, hue=0, grayscale_p=0, flip_p=0)


def batch(meta, b=6, size=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = size or meta.image_size
    return torch.randint(0, 256, (b, meta.channels, size, size), generator=g, dtype=torch.uint8)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("meta", [RGB, GRAY])
def test_shape_dtype_and_value_range(meta):
    x = batch(meta, b=16)
    out = BatchAugment(meta)(x, gen())
    assert out.shape == (16, meta.channels, meta.image_size, meta.image_size) and out.dtype == torch.float32
    mean = torch.tensor(meta.mean).view(1, -1, 1, 1)
    std = torch.tensor(meta.std).view(1, -1, 1, 1)
    raw = out * std + mean  # back to [0, 1]
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5 and torch.isfinite(out).all()


@pytest.mark.parametrize("meta", [RGB, GRAY])
def test_everything_off_is_plain_normalisation(meta):
    x = batch(meta)
    expected = (x.float() / 255 - torch.tensor(meta.mean).view(1, -1, 1, 1)) / torch.tensor(meta.std).view(1, -1, 1, 1)
    out = BatchAugment(meta, **OFF)(x, gen())
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(batch_eval(x, meta), expected, atol=1e-6)


def test_flip_flips():
    x = batch(RGB)
    out = BatchAugment(RGB, **dict(OFF, flip_p=1.0))(x, gen())
    assert torch.allclose(out, batch_eval(x, RGB).flip(-1), atol=1e-5)


def test_crop_box_is_exact_when_not_resized():
    """A 16x16 box resized to 16x16 must equal slicing; flipped, the flipped slice."""
    x = batch(RGB, b=2)
    aug = BatchAugment(RGB, image_size=16)
    boxes = torch.tensor([[3.0, 5.0, 16.0, 16.0], [0.0, 16.0, 16.0, 16.0]])  # top, left, h, w
    out = aug._crop_flip(x.float(), boxes, torch.tensor([False, True]))
    assert torch.allclose(out[0], x[0, :, 3:19, 5:21].float(), atol=1e-3)
    assert torch.allclose(out[1], x[1, :, 0:16, 16:32].float().flip(-1), atol=1e-3)


def test_crop_upscale_matches_interpolate_inside():
    """Away from the box border, grid_sample equals cropping then bilinear resizing."""
    x = batch(RGB, b=1).float()
    aug = BatchAugment(RGB, image_size=32)
    out = aug._crop_flip(x, torch.tensor([[4.0, 2.0, 16.0, 16.0]]), torch.tensor([False]))
    ref = torch.nn.functional.interpolate(x[:, :, 4:20, 2:18], size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-3)


def test_deterministic_given_generator():
    x = batch(RGB, b=8)
    aug = BatchAugment(RGB)
    a, b, c = aug(x, gen(1)), aug(x, gen(1)), aug(x, gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    stored = BatchAugment(RGB, generator=gen(1))
    assert torch.equal(stored(x), a)


def test_crop_params_follow_the_recipe():
    aug = BatchAugment(RGB)
    boxes = aug.sample_params(4000, 32, 32, gen())["boxes"]
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    assert torch.equal(boxes, boxes.round())
    area = h * w / 1024
    # integer rounding moves the area a little outside [0.2, 1]
    assert area.min() >= 0.17 and area.max() <= 1.0 and 0.55 < area.mean() < 0.65
    assert (w / h).min() >= 0.6 and (w / h).max() <= 1.7


def test_fallback_when_no_try_fits():
    aug = BatchAugment(RGB, scale=(1.0, 1.0), ratio=(2.0, 3.0))
    boxes = aug.sample_params(5, 32, 32, gen())["boxes"]
    assert boxes.tolist() == [[(32 - 16) // 2, 0, 16, 32]] * 5  # widest allowed ratio 2, centred


@pytest.mark.parametrize("name, ref, factors", [
    ("_brightness", TF.adjust_brightness, [0.6, 1.4, 1.0]),
    ("_contrast", TF.adjust_contrast, [0.6, 1.4, 1.0]),
    ("_saturation", TF.adjust_saturation, [0.6, 1.4, 1.0]),
    ("_hue", TF.adjust_hue, [-0.4, 0.4, 0.13]),
])
def test_jitter_ops_match_torchvision(name, ref, factors):
    x = torch.rand(3, 3, 12, 12, generator=gen())
    x[0, :, :3] = 0.5  # gray pixels (zero chroma)
    x[1, :, :2] = torch.tensor([1.0, 1.0, 0.0]).view(3, 1, 1)  # ties between max channels
    out = getattr(ba, name)(x.clone(), torch.tensor(factors))
    expected = torch.stack([ref(x[k], factors[k]) for k in range(3)])
    # torchvision's tensor luma uses 0.2989 for red, PIL (and we) 0.299
    assert torch.allclose(out, expected, atol=1e-4)


def test_grayscale_always_and_never():
    x = batch(RGB)
    out = BatchAugment(RGB, **dict(OFF, grayscale_p=1.0))(x, gen())
    raw = out * torch.tensor(RGB.std).view(1, 3, 1, 1) + torch.tensor(RGB.mean).view(1, 3, 1, 1)
    assert torch.allclose(raw[:, 0], raw[:, 1], atol=1e-5) and torch.allclose(raw[:, 1], raw[:, 2], atol=1e-5)


def test_grayscale_data_gets_only_brightness_and_contrast():
    aug = BatchAugment(GRAY)
    assert aug.strengths == (0.4, 0.4, 0.0, 0.0) and aug.grayscale_p == 0.0
    x = batch(GRAY)
    out = aug(x, gen())
    assert out.shape == (6, 1, 28, 28)


def test_jitter_order_is_a_permutation_per_sample():
    order = BatchAugment(RGB).sample_params(50, 32, 32, gen())["order"]
    assert torch.equal(order.sort(1).values, torch.arange(4).expand(50, 4))
    assert len({tuple(o) for o in order.tolist()}) > 5


def test_other_output_size_and_eval_resize():
    x = batch(GRAY, size=28)
    meta = SimpleNamespace(channels=1, image_size=20, mean=(0.5,), std=(0.5,))
    assert BatchAugment(meta)(x, gen()).shape == (6, 1, 20, 20)
    assert batch_eval(x, meta).shape == (6, 1, 20, 20)


def test_input_validation():
    aug = BatchAugment(RGB)
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.rand(2, 3, 32, 32), gen())
    with pytest.raises(ValueError, match="1 channels"):
        aug(batch(GRAY), gen())
    with pytest.raises(ValueError, match="torch.Generator"):
        aug(batch(RGB))
    with pytest.raises(ValueError, match="needs channels"):
        BatchAugment(image_size=8, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="scale"):
        BatchAugment(RGB, scale=(0.0, 1.0))


def test_ratio_constants():
    aug = BatchAugment(RGB)
    assert aug.scale == (0.2, 1.0) and math.isclose(aug.ratio[0], 3 / 4) and aug.flip_p == 0.5


@pytest.mark.parametrize("meta", [RGB, GRAY])
def test_matches_per_sample_reference(meta):
    """The grouped, in-place batch path equals a plain per-sample loop with torchvision's functional ops."""
    x = batch(meta, b=24)
    aug = BatchAugment(meta, grayscale_p=0.5)
    out = aug(x, gen(5))
    p = aug.sample_params(24, meta.image_size, meta.image_size, gen(5))
    refs = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    mean = torch.tensor(meta.mean).view(-1, 1, 1)
    std = torch.tensor(meta.std).view(-1, 1, 1)
    for i in range(24):
        img = aug._crop_flip(x[i:i + 1].float() / 255, p["boxes"][i:i + 1], p["flip"][i:i + 1])[0].clamp(0, 1)
        for k in p["order"][i].tolist():
            if aug.strengths[k] > 0:
                img = refs[k](img, p["factors"][i, k].item())
        if meta.channels == 3 and p["gray"][i]:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        assert torch.allclose(out[i], (img - mean) / std, atol=2e-3), i


@pytest.mark.parametrize("meta", [RGB, GRAY])
@pytest.mark.parametrize("chunk_pixels", [1, 3 * 32 * 32, 1 << 30])
def test_cpu_chunks_give_the_values_of_one_pass(meta, chunk_pixels, monkeypatch):
    """On a CPU the batch is augmented a few samples at a time (cache-sized chunks): bit for bit the values of one
    pass over the whole batch, whatever the chunk (1 sample, 3 samples across jitter-group borders, all)."""
    x = batch(meta, b=37)
    aug = BatchAugment(meta, grayscale_p=0.3)
    monkeypatch.setattr(ba, "CPU_CHUNK_PIXELS", 1 << 40)  # one chunk: the whole batch
    whole = aug(x, gen(7))
    monkeypatch.setattr(ba, "CPU_CHUNK_PIXELS", chunk_pixels)
    assert torch.equal(aug(x, gen(7)), whole)


def test_hue_matches_a_float64_hsv_reference():
    """_hue against colorsys (float64, from the definition: RGB -> HSV, h + shift mod 1, HSV -> RGB), every
    shift sign and size, gray pixels, ties between the max channels and pixels at 0 and 1."""
    import colorsys

    g = gen(11)
    x = torch.rand(4, 3, 9, 9, generator=g, dtype=torch.float64)
    x[:, :, 0, :3] = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 0.0], [0.2, 0.7, 0.7]]).T  # gray, r=g max, g=b max
    x[:, :, 1, :2] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]).T
    shifts = [-0.5, -0.13, 0.27, 0.5]
    out = ba._hue(x.float(), torch.tensor(shifts))
    ref = torch.empty_like(x)
    for n, s in enumerate(shifts):
        for i in range(9):
            for j in range(9):
                h, sat, v = colorsys.rgb_to_hsv(*x[n, :, i, j].tolist())
                ref[n, :, i, j] = torch.tensor(colorsys.hsv_to_rgb((h + s) % 1.0, sat, v), dtype=torch.float64)
    assert (out.double() - ref).abs().max() < 2e-6


@pytest.mark.parametrize("rgb, shift, expected", [
    ((1.0, 0.0, 0.0), 1 / 3, (0.0, 1.0, 0.0)),  # red -> green -> blue -> red
    ((0.0, 1.0, 0.0), 1 / 3, (0.0, 0.0, 1.0)),
    ((0.0, 0.0, 1.0), 1 / 3, (1.0, 0.0, 0.0)),
    ((1.0, 0.0, 0.0), -1 / 3, (0.0, 0.0, 1.0)),
    ((1.0, 1.0, 0.0), 1 / 6, (0.0, 1.0, 0.0)),  # yellow (a tie of the max) one sixth on: green
    ((0.8, 0.4, 0.2), 0.5, (0.2, 0.6, 0.8)),  # half a turn: the complement around (max + min) / 2
    ((0.3, 0.3, 0.3), 0.4, (0.3, 0.3, 0.3)),  # gray stays
])
def test_hue_hand_built_cases(rgb, shift, expected):
    x = torch.tensor(rgb).view(1, 3, 1, 1)
    out = ba._hue(x.clone(), torch.tensor([shift]))
    assert torch.allclose(out.view(3), torch.tensor(expected), atol=1e-6)
