"""How close is the training step to this machine's measured limit? Dense rates, the step's achieved rate, a profile.

1. The machine's limits on the training device: a 2048 x 2048 matmul and the encoder's typical conv (convnet-s-pool2
   layer 3 at 28 px: 64 -> 128 channels, 3x3, stride 2, on 512 x 64 x 14 x 14 channels-last, forward), each in float32
   and bf16; GFLOP/s = counted FLOPs / median time.
2. The demo training step's achieved rate per part, built as training builds it (TrainConfig.from_recipe("fast",
   batch_size=256) resolved for 60,000 28 px images, build_seeded_model, channels-last, bf16 autocast only where
   resolve_amp allows it: CUDA and CPUs with native bf16) on 2 x 256 synthetic views: (a) encoder + head forward,
   (b) encoder + head forward + backward, (c) the whole step (the loop's own _step_loss, backward, SGD step, bank
   update; data loading and augmentation are not part of it: see bench_step.py). For each: ms per call, FLOPs,
   GFLOP/s, and the share of the matmul limit of the precision the step uses (and of the bf16 matmul limit, and of
   the conv limit of the step's precision).
3. Where the time goes: torch.profiler over encoder + head forward + backward, the top ops by self time.

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode, never guessed: matmuls and convolutions (forward and
backward) only; batch norm, ReLU, pooling, the loss's elementwise work, the optimizer and the bank update count 0,
so "achieved GFLOP/s" is the rate of the dense work within the measured wall time (the limits' FLOPs are counted
on meta tensors, the step's on its first warm-up call). Each time is the median of --repeats calls after --warmup
calls; a measurement whose timed calls pass --budget seconds stops after 3 of them, and one whose single call passes
it keeps that call alone (n = 1 in the table): bf16 on a CPU without native bf16 is emulated, and the 2048 matmul
then takes about a minute a call (0.3 GFLOP/s on the 2-core AVX2 EPYC where this was written).

    python benchmarks/bench_roofline.py [--device auto|cpu|cuda] [--repeats 7] [--warmup 2] [--budget 20]
                                        [--profile-iters 3] [--matmul-n 2048] [--quick] [--json-out PATH]

--quick: tiny sizes (a few seconds; for tests). benchmarks/bench_gpu.py prints the same tables on CUDA.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time

import _machine
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from instdisc.method import build_seeded_model
from instdisc.training import TrainConfig
from instdisc.training.loop import _step_loss  # the loop's own loss of a batch: the step timed is the step trained
from instdisc.training.precision import as_channels_last, autocast, cpu_has_native_bf16, resolve_amp, \
    use_channels_last

__all__ = ["Sizes", "FULL", "QUICK", "matmul_flops", "conv2d_flops", "count_flops", "times_ms", "time_ms",
           "dense_limits", "demo_model", "TrainingStep", "step_parts", "profile_ops", "run", "format_tables", "main"]

DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Sizes:
    matmul_n: int = 2048
    conv: tuple[int, int, int, int, int, int] = (512, 64, 128, 14, 3, 2)  # batch, c_in, c_out, side, kernel, stride
    arch: str = "convnet-s-pool2"
    batch_size: int = 256  # x views (2 in the fast recipe) = images per encoder call
    n_data: int = 60000  # Fashion-MNIST train
    image_size: int = 28
    channels: int = 1


FULL = Sizes()
QUICK = Sizes(matmul_n=128, conv=(16, 8, 16, 8, 3, 2), batch_size=16, n_data=512, image_size=16)


# ------------------------------------------------------------------------------------------------- counting, timing
def matmul_flops(m: int, n: int, k: int) -> int:
    """(m, k) @ (k, n): one multiply and one add per term."""
    return 2 * m * n * k


def conv_out_side(side: int, kernel: int, stride: int, padding: int) -> int:
    return (side + 2 * padding - kernel) // stride + 1


def conv2d_flops(batch: int, c_in: int, c_out: int, kernel: int, h_out: int, w_out: int) -> int:
    """A dense conv2d forward (groups=1, no bias): one multiply-add per weight per output pixel."""
    return 2 * c_out * c_in * kernel * kernel * h_out * w_out * batch


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn`` as torch.utils.flop_counter counts them (matmuls, convolutions, their backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MIN_REPEATS = 3  # a time budget cuts a measurement to fewer timed calls only when one call alone is past it


def _call_ms(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1000


def times_ms(fn, device: torch.device, repeats: int, warmup: int, budget_s: float | None = None) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn`` in ms, after ``warmup`` calls (CUDA: synchronized around each call).

    ``budget_s``: the timed calls stop once they took that long, after MIN_REPEATS of them; a single call (warm-up
    or timed) past the budget ends the measurement at once, as its only time (at that length warm-up effects are
    noise). bf16 on a CPU without native bf16 is emulated: a 2048 matmul then takes about a minute."""
    budget_ms = None if budget_s is None else budget_s * 1000
    for _ in range(warmup):
        t = _call_ms(fn, device)
        if budget_ms is not None and t >= budget_ms:
            return [t]
    times = []
    for _ in range(repeats):
        times.append(_call_ms(fn, device))
        if budget_ms is not None and (times[-1] >= budget_ms or (len(times) >= MIN_REPEATS
                                                                 and sum(times) >= budget_ms)):
            break
    return times


def time_ms(fn, device: torch.device, repeats: int, warmup: int, budget_s: float | None = None) -> float:
    """The median of :func:`times_ms`."""
    return statistics.median(times_ms(fn, device, repeats, warmup, budget_s))


def _progress(msg: str) -> None:
    print(f"bench_roofline: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- 1. the limits
def dense_limits(device: torch.device, sizes: Sizes = FULL, repeats: int = 7, warmup: int = 2,
                 budget_s: float | None = None) -> list[dict]:
    """The measured dense rates: matmul and the encoder's conv, float32 and bf16, on ``device``. Their FLOPs are
    counted on meta tensors (the same ops, no compute)."""
    g = torch.Generator().manual_seed(0)
    n = sizes.matmul_n
    b, c_in, c_out, side, kernel, stride = sizes.conv
    rows = []
    for op in ("matmul", "conv2d"):
        for name, dtype in DTYPES.items():
            if op == "matmul":
                a, w = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
                shape = f"{n}x{n} @ {n}x{n}"
                op_fn = torch.mm
            else:
                a = as_channels_last(torch.randn(b, c_in, side, side, generator=g).to(device, dtype))
                w = as_channels_last(torch.randn(c_out, c_in, kernel, kernel, generator=g).to(device, dtype))
                out = conv_out_side(side, kernel, stride, kernel // 2)
                shape = f"{b}x{c_in}x{side}x{side} -> {c_out}x{out}x{out}, {kernel}x{kernel} s{stride}"
                op_fn = functools.partial(F.conv2d, stride=stride, padding=kernel // 2)
            _progress(f"{op} {name} {shape}")
            with torch.no_grad():
                flops = count_flops(functools.partial(op_fn, a.to("meta"), w.to("meta")))
                times = times_ms(functools.partial(op_fn, a, w), device, repeats, warmup, budget_s)
            ms = statistics.median(times)
            rows.append({"op": op, "dtype": name, "shape": shape, "flops": flops, "ms": ms,
                         "gflops": flops / ms / 1e6, "repeats": len(times)})
    return rows


def limit(limits: list[dict], op: str, dtype: str) -> float:
    return next(r["gflops"] for r in limits if r["op"] == op and r["dtype"] == dtype)


# ------------------------------------------------------------------------------------------------- 2. the step
def demo_model(sizes: Sizes = FULL):
    """(config, model) of the demo step as training builds them: the fast recipe resolved for ``sizes`` (K, budget,
    crop), the seeded model in train mode, parameters in their default layout."""
    n, size = sizes.n_data, sizes.image_size
    cfg = TrainConfig.from_recipe("fast", arch=sizes.arch, batch_size=sizes.batch_size)
    cfg.resolve_for_data(n)
    cfg.resolve_budget(n)
    cfg.resolve_for_images(size)
    cfg.validate_for_data(n)
    return cfg, build_seeded_model(cfg, n_data=n, in_channels=sizes.channels, image_size=size).train()


class TrainingStep:
    """The demo model and its step on synthetic views, built and run as instdisc.training.loop builds and runs them."""

    def __init__(self, device: torch.device, sizes: Sizes = FULL):
        n, size = sizes.n_data, sizes.image_size
        cfg, model = demo_model(sizes)
        use_channels_last(model.to(device))
        self.cfg, self.model, self.device = cfg, model, device
        self.amp = resolve_amp(cfg.amp, device)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        g = torch.Generator().manual_seed(0)
        B = cfg.batch_size
        self.views = [torch.randn(B, sizes.channels, size, size, generator=g).to(device) for _ in range(cfg.views)]
        self.x = as_channels_last(torch.cat(self.views, 0))  # (V*B, C, H, W): what _step_loss feeds the encoder
        self.idx = torch.randperm(n, generator=g)[:B].to(device)
        self.grad_z = torch.randn(self.x.shape[0], cfg.low_dim, generator=g).to(device)  # upstream d loss / d z
        self.g_neg = torch.Generator(device=device)

    @property
    def precision(self) -> str:
        return "bf16" if self.amp else "float32"

    def forward(self) -> torch.Tensor:
        """(a) encoder + head forward, autograd recording as in training."""
        with autocast(self.device, self.amp):
            return self.model.embed(self.x)  # (V*B, low_dim)

    def forward_backward(self) -> None:
        """(b) encoder + head forward + backward (d loss / d z given)."""
        z = self.forward()
        self.optimizer.zero_grad(set_to_none=True)
        z.backward(self.grad_z.to(z.dtype))

    def step(self) -> None:
        """(c) the whole step of train_one_epoch: loss, backward, optimizer step, bank update."""
        self.g_neg.manual_seed(0)
        loss, _, z_update = _step_loss(self.model, self.views, self.idx, self.cfg, self.g_neg, self.amp)
        loss.item()  # as the loop reads the loss (a host sync on CUDA)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.model.objective.update(self.idx, z_update)


PARTS = (("encoder+head forward", "forward"), ("encoder+head fwd+bwd", "forward_backward"), ("whole step", "step"))


def step_parts(step: TrainingStep, limits: list[dict], repeats: int = 7, warmup: int = 2,
               budget_s: float | None = None) -> list[dict]:
    """Each part: ms per call, FLOPs, achieved GFLOP/s and its fraction of the measured limits (the call that counts
    the FLOPs is the first warm-up call)."""
    prec = step.precision
    mm, mm_bf16, conv = limit(limits, "matmul", prec), limit(limits, "matmul", "bf16"), limit(limits, "conv2d", prec)
    rows = []
    for name, method in PARTS:
        fn = getattr(step, method)
        _progress(name)
        flops = count_flops(fn)
        times = times_ms(fn, step.device, repeats, max(0, warmup - 1), budget_s)
        ms = statistics.median(times)
        gflops = flops / ms / 1e6
        rows.append({"part": name, "precision": prec, "ms": ms, "repeats": len(times), "flops": flops,
                     "gflops": gflops,
                     "of_matmul_limit": gflops / mm, "of_bf16_matmul_limit": gflops / mm_bf16,
                     "of_conv_limit": gflops / conv, "images_per_s": step.x.shape[0] / step.cfg.views / ms * 1000})
    return rows


# ------------------------------------------------------------------------------------------------- 3. the profile
def profile_ops(fn, device: torch.device, iters: int = 3, top: int = 12, warmup: int = 1) -> dict:
    """torch.profiler over ``iters`` calls of ``fn``: the ``top`` ops by self CPU time (on CUDA: by self device time),
    each with its self ms per call and its share of the total self time."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    _sync(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        _sync(device)
    events = list(prof.key_averages())
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    self_us = lambda e: float(getattr(e, attr, 0.0) or 0.0)  # noqa: E731
    total = sum(self_us(e) for e in events) or 1.0
    events.sort(key=self_us, reverse=True)
    ops = [{"op": e.key, "self_ms": self_us(e) / iters / 1000, "share": self_us(e) / total, "calls": e.count / iters}
           for e in events[:top]]
    return {"clock": "self device time" if cuda else "self CPU time", "iters": iters, "total_self_ms": total / iters
            / 1000, "ops": ops}


# ------------------------------------------------------------------------------------------------- run, print
def run(device: str | torch.device = "cpu", repeats: int = 7, warmup: int = 2, quick: bool = False,
        profile_iters: int = 3, top: int = 12, budget_s: float | None = 20.0, matmul_n: int | None = None) -> dict:
    """Everything bench_roofline measures, as one dict (the JSON's body but the machine)."""
    device = torch.device(device)
    sizes = QUICK if quick else FULL
    if matmul_n is not None:
        sizes = dataclasses.replace(sizes, matmul_n=matmul_n)
    limits = dense_limits(device, sizes, repeats, warmup, budget_s)
    step = TrainingStep(device, sizes)
    parts = step_parts(step, limits, repeats, warmup, budget_s)
    _progress("profile")
    prof = profile_ops(step.forward_backward, device, iters=profile_iters, top=top, warmup=0)  # warm already
    cfg = step.cfg
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _machine.cpu_model()
    return {"config": {"device": str(device), "device_name": name, "sizes": dataclasses.asdict(sizes),
                       "repeats": repeats, "warmup": warmup, "budget_s": budget_s, "threads": torch.get_num_threads(),
                       "precision": step.precision, "amp_asked": cfg.amp,
                       "cpu_native_bf16": cpu_has_native_bf16(), "recipe": cfg.recipe, "arch": cfg.arch,
                       "batch_size": cfg.batch_size, "views": cfg.views, "nce_k": cfg.nce_k, "loss": cfg.loss,
                       "negatives": cfg.negatives, "float32_matmul_precision": torch.get_float32_matmul_precision()},
            "limits": limits, "parts": parts, "profile": prof}


def format_tables(res: dict) -> str:
    c = res["config"]
    s = c["sizes"]
    prec = c["precision"]
    why = ("bf16 autocast" if prec == "bf16" else
           "float32: bf16 autocast " + ("off in the config" if not c["amp_asked"] else "off, no native bf16 here"))
    lines = [f"measured limits on {c['device']} ({c['device_name']}, {c['threads']} threads); ms: median of n timed "
             f"calls after {c['warmup']} warm-up calls",
             f"{'op':<8} {'dtype':<8} {'shape':<38} {'GFLOP':>8} {'ms':>9} {'n':>3} {'GFLOP/s':>9}"]
    for r in res["limits"]:
        lines.append(f"{r['op']:<8} {r['dtype']:<8} {r['shape']:<38} {r['flops'] / 1e9:>8.3f} {r['ms']:>9.2f} "
                     f"{r['repeats']:>3} {r['gflops']:>9.1f}")
    if c["device"] == "cpu" and not c["cpu_native_bf16"]:
        lines.append("bf16 is emulated on this CPU (no AVX512-BF16 / AMX): training runs float32 here")
    lines += ["", f"training step: {c['arch']}, {c['recipe']} recipe, batch {c['batch_size']} x {c['views']} views = "
                  f"{c['batch_size'] * c['views']} images of {s['channels']}x{s['image_size']}x{s['image_size']}, "
                  f"K={c['nce_k']}, {why}",
              f"{'part':<22} {'ms':>9} {'n':>3} {'GFLOP':>8} {'GFLOP/s':>9} {'%mm ' + prec:>12} {'%mm bf16':>9} "
              f"{'%conv ' + prec:>13}"]
    for r in res["parts"]:
        lines.append(f"{r['part']:<22} {r['ms']:>9.1f} {r['repeats']:>3} {r['flops'] / 1e9:>8.2f} {r['gflops']:>9.1f} "
                     f"{r['of_matmul_limit'] * 100:>11.1f}% {r['of_bf16_matmul_limit'] * 100:>8.1f}% "
                     f"{r['of_conv_limit'] * 100:>12.1f}%")
    p = res["profile"]
    lines += ["", f"where the time goes: encoder+head fwd+bwd, torch.profiler {p['clock']}, mean of {p['iters']} "
                  f"calls ({p['total_self_ms']:.1f} ms each under the profiler)",
              f"{'op':<52} {'self ms':>9} {'share':>7} {'calls':>6}"]
    for o in p["ops"]:
        lines.append(f"{o['op'][:52]:<52} {o['self_ms']:>9.2f} {o['share'] * 100:>6.1f}% {o['calls']:>6.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="the training device (auto: CUDA when present, else CPU)")
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per measurement (the median is kept)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls before them")
    ap.add_argument("--budget", type=float, default=20.0,
                    help="seconds of timed calls per measurement before it stops repeating (at least 3 calls)")
    ap.add_argument("--profile-iters", type=int, default=3)
    ap.add_argument("--matmul-n", type=int, default=None, help="side of the limit's matmul (default 2048; --quick 128)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (for tests; the figures mean little)")
    ap.add_argument("--json-out", default=str(_machine.REPO / "benchmarks/results/bench_roofline.json"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if args.repeats < 1 or args.warmup < 0 or args.profile_iters < 1 or (args.matmul_n or 1) < 1:
        ap.error("--repeats, --profile-iters and --matmul-n must be at least 1, --warmup at least 0")
    args.device = device  # resolved, so that the recorded command names them
    if args.matmul_n is None:
        args.matmul_n = (QUICK if args.quick else FULL).matmul_n
    res = run(device, repeats=args.repeats, warmup=args.warmup, quick=args.quick, profile_iters=args.profile_iters,
              budget_s=args.budget, matmul_n=args.matmul_n)
    print(format_tables(res))
    path = _machine.write_json(args.json_out, {"benchmark": "bench_roofline",
                                               "command": _machine.command_line("bench_roofline.py", args),
                                               "machine": _machine.machine_info(), **res})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
