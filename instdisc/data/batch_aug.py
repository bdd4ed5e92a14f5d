"""The InstDisc augmentation recipe on whole uint8 batches, on any device. Covered by tests/test_data_batch_aug.py.

Same recipe and parameter distributions as :func:`instdisc.data.transforms.train_transform`, drawn per sample:

1. random resized crop (torchvision's sampling: 10 tries of area in ``scale`` x aspect log-uniform in ``ratio``,
   integer box, centre-crop fallback) and horizontal flip, both done by one ``affine_grid`` + bilinear
   ``grid_sample`` (no antialiasing: crops of the in-memory datasets are only ever enlarged);
2. colour jitter: brightness, contrast, saturation, hue (the last two RGB only), each sample in its own random
   order as ColorJitter does; hue is a rotation of the HSV hue;
3. random grayscale (RGB only);
4. normalise with the dataset's mean / std.

All randomness comes from the ``torch.Generator`` passed in; parameters are drawn on the generator's device and
moved to the data's, so a CPU generator gives the same crops whether the batch is on CPU or GPU.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .transforms import CROP_SCALE, GRAYSCALE_P, JITTER

__all__ = ["BatchAugment", "batch_eval", "to_float", "normalize", "rgb_to_gray"]

_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL "L" and torchvision
_TRIES = 10
CPU_CHUNK_PIXELS = 1 << 18  # on a CPU, samples augmented at once hold about this many pixels per channel


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 B x C x H x W -> float32 in [0, 1]."""
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"expected a uint8 B x C x H x W tensor, got {x.dtype} {tuple(x.shape)}")
    return x.float().div_(255.0)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel; x float B x C x H x W."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W -> B x 1 x H x W luma (elementwise on the channel planes: faster than a channel reduction)."""
    r, g, b = x.unbind(1)
    out = r * _GRAY_WEIGHTS[0]
    out.add_(g, alpha=_GRAY_WEIGHTS[1]).add_(b, alpha=_GRAY_WEIGHTS[2])
    return out.unsqueeze(1)


def batch_eval(x: torch.Tensor, ds) -> torch.Tensor:
    """Deterministic counterpart of :func:`~instdisc.data.transforms.eval_transform` for in-memory data:
    uint8 B x C x H x W -> normalised float32 B x C x S x S (the centre ``ds.eval_crop`` fraction when set, then a
    bilinear antialiased resize only when the size differs from S)."""
    xf = to_float(x)
    size = ds.image_size
    crop = getattr(ds, "eval_crop", None)  # image caches: the centre fraction a folder's eval transform keeps
    if crop:
        h, w = xf.shape[-2:]
        ch, cw = max(1, round(h * crop)), max(1, round(w * crop))
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))  # as torchvision's CenterCrop
        xf = xf[..., top:top + ch, left:left + cw]
    if xf.shape[-2:] != (size, size):
        xf = F.interpolate(xf, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return normalize(xf, ds.mean, ds.std)


# Jitter ops: modify float B x C x H x W ``x`` (values in [0, 1]) IN PLACE with per-sample factors (b,), return it.
def _brightness(x, f):
    return x.mul_(f.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _contrast(x, f):
    """Blend with the image's mean luma (mean luma = luma of the per-channel means, luma being linear)."""
    means = x.mean(dim=(2, 3))  # b x C
    if x.shape[1] == 3:
        means = means @ torch.tensor(_GRAY_WEIGHTS, dtype=x.dtype, device=x.device)  # (b,)
    else:
        means = means[:, 0]
    return x.mul_(f.view(-1, 1, 1, 1)).add_(((1.0 - f) * means).view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _saturation(x, f):
    """Blend with the per-pixel luma."""
    gray = rgb_to_gray(x).mul_((1.0 - f).view(-1, 1, 1, 1))  # b x 1 x H x W
    return x.mul_(f.view(-1, 1, 1, 1)).add_(gray).clamp_(0.0, 1.0)


def _hue(x, shift, work=None):
    """Rotate the HSV hue by ``shift`` turns, keeping HSV value and saturation.

    With v = max, c = max - min (chroma) and the hue h6 in sixths of a turn, HSV -> RGB is
    out_n = v - c * clamp(min(k, 4 - k), 0, 1), k = (n + h6) mod 6, for n = 5, 3, 1 (red, green, blue);
    a gray pixel (c = 0) stays v whatever its hue. Elementwise ops on the channel planes throughout (reductions
    over the channel dim are ~30x slower on CPU), written into ``work`` (>= 5 x b x H x W float scratch, see
    :func:`_hue_workspace`; allocated when None): fresh megabyte temporaries cost more in page faults than the
    arithmetic, and ``torch.where`` is ~20x slower than a multiply-add blend on CPU.
    """
    n = x.shape[0]
    if work is None:
        work = _hue_workspace(x)
    v, c, h, k, t = (w[:n] for w in work[0])  # each n x H x W
    mask = work[1][:n]  # n x H x W bool
    r, g, b = x.unbind(1)  # views, each n x H x W
    torch.maximum(torch.maximum(r, g, out=v), b, out=v)
    torch.minimum(torch.minimum(r, g, out=c), b, out=c)
    torch.sub(v, c, out=c)
    # h6 * c: (r - g) + 4c where blue is the max, (b - r) + 2c where green is, (g - b) where red is (ties: red, then
    # green, as a chain of wheres); each branch blended in as h += [max is that channel] * (branch - h)
    torch.sub(r, g, out=h).add_(c, alpha=4.0)
    torch.sub(b, r, out=k).add_(c, alpha=2.0).sub_(h)
    h.addcmul_(t.copy_(torch.eq(v, g, out=mask)), k)
    torch.sub(g, b, out=k).sub_(h)
    h.addcmul_(t.copy_(torch.eq(v, r, out=mask)), k)
    h.mul_(torch.clamp_min(c, 1e-12, out=t).reciprocal_())
    # h6 in [-1, 5) and 6 shift in [-3, 3]: + 12 keeps every k positive, so x - trunc(x) (frac) is the fraction
    h.add_((6.0 * shift + 12.0).view(-1, 1, 1))
    for ch, off in enumerate((5.0, 3.0, 1.0)):  # r, g, b are not read again, so overwriting x is safe
        torch.add(h, off, out=k).div_(6.0).frac_().mul_(6.0).sub_(2.0).abs_()  # |((off + h6) mod 6) - 2|
        k.neg_().add_(2.0).clamp_(0.0, 1.0).mul_(c)  # clamp(min(k, 4 - k), 0, 1) c for k in [0, 6)
        torch.sub(v, k, out=x[:, ch])
    return x


def _hue_workspace(x):
    """Scratch for :func:`_hue` on batches like ``x`` (b x 3 x H x W) or smaller: (5 float planes, 1 bool plane)."""
    b, _, hh, ww = x.shape
    return (x.new_empty(5, b, hh, ww), torch.empty(b, hh, ww, dtype=torch.bool, device=x.device))


_OPS = (_brightness, _contrast, _saturation, _hue)
_HUE = 3  # index of _hue in _OPS


class BatchAugment:
    """``aug(x, generator) -> float32 B x C x S x S`` for a uint8 B x C x H x W batch ``x``.

    ``meta`` is anything with ``channels``, ``image_size``, ``mean``, ``std`` (an IndexedDataset); keywords override
    them and the recipe. ``generator`` given here is used when a call passes none.
    """

    def __init__(self, meta=None, *, channels: int | None = None, image_size: int | None = None, mean=None,
                 std=None, scale=CROP_SCALE, ratio=(3 / 4, 4 / 3), brightness: float = JITTER,
                 contrast: float = JITTER, saturation: float = JITTER, hue: float = JITTER,
                 grayscale_p: float = GRAYSCALE_P, flip_p: float = 0.5, generator: torch.Generator | None = None):
        def pick(value, attr):
            if value is not None:
                return value
            if meta is None or not hasattr(meta, attr):
                raise ValueError(f"BatchAugment needs {attr} (give a dataset or {attr}=...)")
            return getattr(meta, attr)

        self.channels = int(pick(channels, "channels"))
        self.image_size = int(pick(image_size, "image_size"))
        self.mean = tuple(pick(mean, "mean"))
        self.std = tuple(pick(std, "std"))
        if self.channels not in (1, 3) or len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"channels={self.channels} with mean {self.mean} / std {self.std}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
        if not (0 <= hue <= 0.5) or min(brightness, contrast, saturation) < 0:
            raise ValueError(f"jitter strengths must be >= 0 and hue <= 0.5, got "
                             f"{(brightness, contrast, saturation, hue)}")
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        rgb = self.channels == 3
        # strength per op in _OPS order; an op with strength 0 is never applied (as ColorJitter)
        self.strengths = (float(brightness), float(contrast), float(saturation) if rgb else 0.0,
                          float(hue) if rgb else 0.0)
        self.grayscale_p = float(grayscale_p) if rgb else 0.0
        self.flip_p = float(flip_p)
        self.generator = generator

    def __repr__(self) -> str:
        return (f"BatchAugment(channels={self.channels}, image_size={self.image_size}, scale={self.scale}, "
                f"ratio={self.ratio}, jitter={self.strengths}, grayscale_p={self.grayscale_p}, "
                f"flip_p={self.flip_p})")

    # -- parameter sampling (on the generator's device) -------------------------------------------------------------
    def _crop_boxes(self, b: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
        """(b, 4) float boxes (top, left, height, width), integer-valued, torchvision's RandomResizedCrop sampling."""
        dev = g.device
        area = float(h * w)
        lo, hi = self.scale
        target = area * (lo + (hi - lo) * torch.rand(b, _TRIES, generator=g, device=dev))  # b x T
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(b, _TRIES, generator=g, device=dev))  # b x T
        cw = torch.sqrt(target * aspect).round()  # b x T
        ch = torch.sqrt(target / aspect).round()
        ok = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)  # b x T
        first = ok.int().argmax(1, keepdim=True)  # first valid try (0 when none)
        cw, ch = cw.gather(1, first).squeeze(1), ch.gather(1, first).squeeze(1)  # (b,)
        u_top, u_left = torch.rand(2, b, generator=g, device=dev)
        top = (u_top * (h - ch + 1)).floor().clamp_max(h - ch)
        left = (u_left * (w - cw + 1)).floor().clamp_max(w - cw)
        # no valid try: whole image cropped to the nearest allowed aspect ratio, centred
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            fw, fh = w, int(round(w / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            fw, fh = int(round(h * self.ratio[1])), h
        else:
            fw, fh = w, h
        none = ~ok.any(1)
        fallback = torch.tensor([(h - fh) // 2, (w - fw) // 2, fh, fw], dtype=torch.float32, device=dev)
        boxes = torch.stack([top, left, ch, cw], 1)  # b x 4
        return torch.where(none[:, None], fallback, boxes)

    def sample_params(self, b: int, h: int, w: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        """Every random choice for a batch: boxes (b,4), flip (b,), factors (b,4), order (b,4), gray (b,)."""
        dev = g.device
        boxes = self._crop_boxes(b, h, w, g)
        flip = torch.rand(b, generator=g, device=dev) < self.flip_p
        u = torch.rand(b, 4, generator=g, device=dev)  # b x 4, one uniform per jitter op
        s = torch.tensor(self.strengths, device=dev)
        lo = torch.cat([(1 - s[:3]).clamp_min(0), -s[3:]])  # brightness/contrast/saturation in [1-s, 1+s]
        hi = torch.cat([1 + s[:3], s[3:]])  # hue shift in [-s, s]
        factors = lo + (hi - lo) * u  # b x 4
        order = torch.rand(b, 4, generator=g, device=dev).argsort(1)  # b x 4, a random permutation per sample
        gray = torch.rand(b, generator=g, device=dev) < self.grayscale_p
        return {"boxes": boxes, "flip": flip, "factors": factors, "order": order, "gray": gray}

    # -- application ------------------------------------------------------------------------------------------------
    def _crop_flip(self, xf: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        b, c, h, w = xf.shape
        size = self.image_size
        top, left, ch, cw = boxes.unbind(1)
        # output pixel centre u_n in [-1, 1] maps to input x_n = (cw/W) u_n + (2 left + cw)/W - 1 (align_corners=False)
        theta = torch.zeros(b, 2, 3, dtype=xf.dtype, device=xf.device)  # b x 2 x 3
        theta[:, 0, 0] = torch.where(flip, -cw, cw) / w
        theta[:, 0, 2] = (2 * left + cw) / w - 1
        theta[:, 1, 1] = ch / h
        theta[:, 1, 2] = (2 * top + ch) / h - 1
        # the map is axis-aligned (no rotation or shear): x depends on the column only and y on the row only, so
        # the grid is two outer sums instead of affine_grid's b x S^2 x 3 by 3 x 2 matmul (same values)
        base = (torch.arange(size, dtype=xf.dtype, device=xf.device) * 2 + 1) / size - 1  # (S,) pixel centres
        gx = theta[:, 0, 0, None] * base + theta[:, 0, 2, None]  # b x S
        gy = theta[:, 1, 1, None] * base + theta[:, 1, 2, None]  # b x S
        grid = torch.stack([gx[:, None, :].expand(b, size, size), gy[:, :, None].expand(b, size, size)], -1)
        return F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False)  # b x C x S x S

    def _jitter_groups(self, order: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, list[int]]]]:
        """Sort the batch so that samples applying the active jitter ops in the same order are adjacent.

        Returns (perm (b,), [(count, op sequence), ...] in perm order): each group is then a contiguous slice of
        the permuted batch, jittered in place on a view, with no per-op gather/scatter.
        """
        active = torch.tensor([k for k, s in enumerate(self.strengths) if s > 0], dtype=order.dtype)
        b = order.shape[0]
        if len(active) == 0:
            return torch.arange(b), [(b, [])]
        seq = order[torch.isin(order, active)].view(b, len(active))  # b x A: active ops in the order they run
        code = (seq * 4 ** torch.arange(len(active))).sum(1)  # (b,) one id per sequence
        perm = code.argsort(stable=True)
        _, counts = torch.unique_consecutive(code[perm], return_counts=True)
        groups, start = [], 0
        for count in counts.tolist():
            groups.append((count, seq[perm[start]].tolist()))
            start += count
        return perm, groups

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        g = generator if generator is not None else self.generator
        if g is None:
            raise ValueError("BatchAugment needs a torch.Generator (argument or constructor)")
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"expected a uint8 B x C x H x W tensor, got {x.dtype} {tuple(x.shape)}")
        b, c, h, w = x.shape
        if c != self.channels:
            raise ValueError(f"batch has {c} channels, BatchAugment was built for {self.channels}")
        p = self.sample_params(b, h, w, g)  # on the generator's device
        perm, groups = self._jitter_groups(p["order"].cpu())
        p = {k: v[perm.to(v.device)].to(x.device) for k, v in p.items()}  # every parameter in permuted order
        dev_perm = perm.to(x.device)
        xs = x.index_select(0, dev_perm)  # B x C x H x W uint8, permuted
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        result = torch.empty(b, c, self.image_size, self.image_size, dtype=torch.float32, device=x.device)
        # On a CPU the batch goes through every step a chunk of samples at a time (CPU_CHUNK_PIXELS per channel
        # plane, 1 MiB of float32: 28 samples at 96 px, 334 at 28 px), so that their planes stay in the cache
        # across the ~40 elementwise passes of the jitter; every step is per sample, so the values are those of
        # one pass (tested). On a GPU one pass.
        chunk = max(1, CPU_CHUNK_PIXELS // self.image_size ** 2) if x.device.type == "cpu" else b
        jitter = list(_OPS)  # the hue rotation writes into scratch allocated once for all chunks
        if self.strengths[_HUE] > 0:
            jitter[_HUE] = functools.partial(_hue, work=_hue_workspace(result[:min(chunk, b)]))
        start = 0
        for count, ops in groups:
            for s in range(start, start + count, chunk):
                e = min(s + chunk, start + count)
                part = self._crop_flip(to_float(xs[s:e]), p["boxes"][s:e], p["flip"][s:e])  # n x C x S x S
                part.clamp_(0.0, 1.0)
                f = p["factors"][s:e]  # n x 4
                for k in ops:
                    jitter[k](part, f[:, k])
                if self.grayscale_p > 0:
                    idx = p["gray"][s:e].nonzero().squeeze(1)
                    if idx.numel():
                        part[idx] = rgb_to_gray(part[idx]).expand(-1, 3, -1, -1)
                part.sub_(mean).div_(std)
                result[dev_perm[s:e]] = part  # back to the input order
            start += count
        return result  # B x C x S x S float32
