"""The InstDisc augmentation recipe on whole uint8 batches, on any device. Covered by tests/test_data_batch_aug.py.

Same recipe and parameter distributions as :func:`instdisc.data.transforms.train_transform`, drawn per sample:

1. random resized crop (torchvision's sampling: 10 tries of area in ``scale`` x aspect log-uniform in ``ratio``,
   integer box, centre-crop fallback) and horizontal flip, both done by one bilinear ``grid_sample`` on an
   axis-aligned grid (no antialiasing: crops of the in-memory datasets are only ever enlarged);
2. colour jitter: brightness, contrast, saturation, hue (the last two RGB only), each sample in its own random
   order as ColorJitter does; hue is a rotation of the HSV hue;
3. random grayscale (RGB only);
4. normalise with the dataset's mean / std.

All randomness comes from the ``torch.Generator`` passed in; parameters are drawn on the generator's device and
moved to the data's, so a CPU generator gives the same crops whether the batch is on CPU or GPU. Every step is
per sample; the batch is put in an order (:meth:`BatchAugment._plan`) where each jitter step and the grayscale
apply to contiguous slices, and on a CPU it goes through in cache-sized chunks; the values are those of one pass
in input order (tested).
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
        # (b,) through rgb_to_gray's elementwise ops: a (b, 3) @ (3,) product's kernel (and rounding) depends on b
        # on some CPUs, and the CPU path augments a batch in chunks that must give the values of one pass
        means = rgb_to_gray(means[:, :, None, None]).view(-1)
    else:
        means = means[:, 0]
    return x.mul_(f.view(-1, 1, 1, 1)).add_(((1.0 - f) * means).view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _saturation(x, f):
    """Blend with the per-pixel luma."""
    gray = rgb_to_gray(x).mul_((1.0 - f).view(-1, 1, 1, 1))  # b x 1 x H x W
    return x.mul_(f.view(-1, 1, 1, 1)).add_(gray).clamp_(0.0, 1.0)


def _hue(x, shift, work=None):
    """Rotate the HSV hue by ``shift`` turns, keeping HSV value and saturation.

    With v = max, c = max - min (chroma) and the hue h in turns, HSV -> RGB is
    out_n = v - c * clamp(min(k, 4 - k), 0, 1), k = (6 h + n) mod 6, for n = 5, 3, 1 (red, green, blue).
    Written with the circular distance d_n = |frac(h + (n + 1) / 6) - 1/2| (so that |k - 2| = 6 d_n wherever the
    clamp does not cut): out_n = (v - 2c) + 6c * clamp(d_n, 1/6, 1/3). A gray pixel (c = 0) stays v whatever its
    hue. Elementwise ops on the channel planes throughout (reductions over the channel dim are ~30x slower on CPU),
    written into ``work`` (>= 6 x b x H x W float scratch, see :func:`_hue_workspace`; allocated when None):
    fresh megabyte temporaries cost more in page faults than the arithmetic, and on a CPU ops that read or write
    bool tensors (masks, ``torch.where``) are ~5x slower than float ones, so the masks are written as 0 / 1 floats.
    """
    n = x.shape[0]
    if work is None:
        work = _hue_workspace(x)
    v, c, h, k, t, c6 = work[:, :n]  # each n x H x W
    r, g, b = x.unbind(1)  # views, each n x H x W
    torch.maximum(torch.maximum(r, g, out=v), b, out=v)
    torch.minimum(torch.minimum(r, g, out=c), b, out=c)
    torch.sub(v, c, out=c)
    # 6 h c: (r - g) + 4c where blue is the max, (b - r) + 2c where green is, (g - b) where red is (ties: red, then
    # green, as a chain of wheres); each branch blended in as h += [max is that channel] * (branch - h)
    torch.sub(r, g, out=h).add_(c, alpha=4.0)
    torch.sub(b, r, out=k).add_(c, alpha=2.0).sub_(h)
    h.addcmul_(torch.eq(v, g, out=t), k)
    torch.sub(g, b, out=k).sub_(h)
    h.addcmul_(torch.eq(v, r, out=t), k)
    torch.mul(c, 6.0, out=c6)
    # hue in turns, rotated; h / (6c) is in [-1/6, 5/6) and the shift in [-1/2, 1/2]: + 2 keeps it positive, so
    # x - trunc(x) (frac) is the fraction
    torch.addcdiv((shift + 2.0).view(-1, 1, 1), h, torch.clamp_min(c6, 1e-12, out=t), out=h)
    torch.add(v, c, alpha=-2.0, out=v)  # v - 2c (v is not read again)
    for ch, off in enumerate((0.0, 4 / 6, 2 / 6)):  # (n + 1) / 6 mod 1; r, g, b are not read again: x is free
        (torch.frac(h, out=k) if off == 0.0 else torch.add(h, off, out=k).frac_()).sub_(0.5).abs_()
        torch.addcmul(v, c6, k.clamp_(1 / 6, 1 / 3), out=x[:, ch])
    return x


def _hue_workspace(x):
    """Scratch for :func:`_hue` on batches like ``x`` (b x 3 x H x W) or smaller: 6 float planes (6 x b x H x W)."""
    b, _, hh, ww = x.shape
    return x.new_empty(6, b, hh, ww)


_OPS = (_brightness, _contrast, _saturation, _hue)
_HUE = 3  # index of _hue in _OPS


def _sample(xf, gx, gy):
    """Bilinear samples of float n x C x H x W ``xf`` at columns ``gx`` (n, S) x rows ``gy`` (n, S) (grid_sample's
    normalised coordinates, border padding) -> n x C x S x S."""
    n, size = gx.shape
    grid = torch.stack([gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)], -1)
    return F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _runs(ops):
    """[(op, start, end), ...]: the runs of equal values in the list ``ops``."""
    out, start = [], 0
    for i in range(1, len(ops) + 1):
        if i == len(ops) or ops[i] != ops[start]:
            out.append((ops[start], start, i))
            start = i
    return out


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
    def _grid_axes(self, boxes: torch.Tensor, flip: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """grid_sample's normalised source coordinates of every output column (b, S) and row (b, S).

        Output pixel centre u_n in [-1, 1] maps to input x_n = (cw/W) u_n + (2 left + cw)/W - 1 (align_corners=False).
        The map is axis-aligned (no rotation or shear), so x depends on the column only and y on the row only."""
        top, left, ch, cw = boxes.unbind(1)
        size = self.image_size
        base = (torch.arange(size, dtype=torch.float32, device=boxes.device) * 2 + 1) / size - 1  # (S,) centres
        gx = (torch.where(flip, -cw, cw) / w)[:, None] * base + ((2 * left + cw) / w - 1)[:, None]  # b x S
        gy = (ch / h)[:, None] * base + ((2 * top + ch) / h - 1)[:, None]  # b x S
        return gx, gy

    def _crop_flip(self, xf: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Crop ``boxes`` (b, 4) of float b x C x H x W ``xf``, flip where ``flip``, bilinear -> b x C x S x S."""
        gx, gy = self._grid_axes(boxes, flip, xf.shape[2], xf.shape[3])
        return _sample(xf, gx, gy)

    def _plan(self, order: torch.Tensor, gray: torch.Tensor) -> tuple[torch.Tensor, list[tuple]]:
        """A batch order in which the work of every step is done on contiguous slices -> (perm (b,), [key of each
        sample, in perm order]); a key is (active jitter ops in the sample's own order..., grayscale 0 / 1).

        The keys are sorted lexicographically, so at every step t the samples whose t-th op is the same form
        contiguous runs (their sequences share a prefix), and the samples turned gray form runs too: each op is
        applied in place to slices, with no gather/scatter per op. ``order`` (b, 4), ``gray`` (b,) bool."""
        active = [k for k, st in enumerate(self.strengths) if st > 0]
        b = order.shape[0]
        seq = order[torch.isin(order, torch.tensor(active, dtype=order.dtype))].view(b, len(active))  # b x A
        keys = torch.cat([seq, gray.view(b, 1).to(seq.dtype)], 1)  # b x (A + 1), every entry in 0..3
        code = (keys * 4 ** torch.arange(len(active), -1, -1)).sum(1)  # (b,) first op most significant
        perm = code.argsort(stable=True)
        return perm, [tuple(k) for k in keys[perm].tolist()]

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
        perm, keys = self._plan(p["order"].cpu(), p["gray"].cpu())
        p = {k: v[perm.to(v.device)].to(x.device) for k, v in p.items()}  # every parameter in permuted order
        dev_perm = perm.to(x.device)
        # per-batch plan, sliced per chunk below: sampling axes, one factor column per op
        gx, gy = self._grid_axes(p["boxes"], p["flip"], h, w)  # each b x S
        factors = [f.contiguous() for f in p["factors"].unbind(1)]  # 4 x (b,)
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
        for s in range(0, b, chunk):
            e = min(s + chunk, b)
            rows = dev_perm[s:e]
            part = _sample(to_float(x.index_select(0, rows)), gx[s:e], gy[s:e])  # n x C x S x S
            part.clamp_(0.0, 1.0)
            for t in range(len(keys[s]) - 1):  # step t of every sample's own op order, op by op over runs
                for k, a, z in _runs([q[t] for q in keys[s:e]]):
                    jitter[k](part[a:z], factors[k][s + a:s + z])
            for turned, a, z in _runs([q[-1] for q in keys[s:e]]):
                if turned:
                    part[a:z] = rgb_to_gray(part[a:z])  # broadcast over the 3 channels
            part.sub_(mean).div_(std)
            result.index_copy_(0, rows, part)  # back to the input order
        return result  # B x C x S x S float32
