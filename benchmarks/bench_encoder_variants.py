"""Ways to run the demo's encoder step faster without changing what it learns, timed against each other in one run.

The step: encoder + projection head forward and backward on 2 x 256 views of 1 x 28 x 28 (convnet-s-pool2, the fast
recipe's MLP head), as training runs it (instdisc/training/loop.py: channels-last weights and input, bf16 autocast
only where resolve_amp allows it). Variants, each built from the same seeded weights, timed interleaved (round
robin, so a machine that slows down slows every variant alike):

* ``eager`` — today's step (channels-last);
* ``contiguous`` — NCHW weights and input instead of channels-last;
* ``compile`` — ``torch.compile`` (inductor, default mode) of encoder + head; its cold compile time is reported
  apart and kept out of the per-step figure;
* ``compile-max`` — ``torch.compile(mode="max-autotune-no-cudagraphs")``;
* ``no-mkldnn`` — ``torch.backends.mkldnn`` off (ATen's own convolutions).

Each variant's gradients are compared with eager's (max abs difference relative to eager's largest), so a faster
variant that computes something else shows. Prints a table and writes JSON with the machine.

    python benchmarks/bench_encoder_variants.py [--rounds 7] [--variants eager,compile,...] [--json-out PATH]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import _machine
import torch

from bench_roofline import FULL, demo_model
from instdisc.training.precision import as_channels_last, autocast, resolve_amp, use_channels_last

VARIANTS = ("eager", "contiguous", "compile", "compile-max", "no-mkldnn")


def _model(channels_last: bool, batch_size: int = 256):
    """bench_roofline's demo model (the same seeded weights for every variant), channels-last as training has it."""
    model = demo_model(dataclasses.replace(FULL, batch_size=batch_size))[1]
    return use_channels_last(model) if channels_last else model


class Variant:
    def __init__(self, name: str, x: torch.Tensor, amp: bool):
        self.name, self.amp = name, amp
        self.target = torch.randn(x.shape[0], 128, generator=torch.Generator().manual_seed(1))  # (2B, low_dim)
        self.model = _model(name != "contiguous", x.shape[0] // 2).to(x.device)
        self.target = self.target.to(x.device)
        self.x = x.contiguous() if name == "contiguous" else as_channels_last(x)
        embed = lambda v: self.model.head(self.model.encoder(v))  # noqa: E731 (images -> z before normalising)
        self.fn = embed
        self.compile_s = None
        if name.startswith("compile"):
            mode = "max-autotune-no-cudagraphs" if name == "compile-max" else None
            self.fn = torch.compile(embed, mode=mode)
            t0 = time.perf_counter()
            self.step()
            _sync(x.device)
            self.compile_s = time.perf_counter() - t0

    def step(self) -> None:
        mkldnn = torch.backends.mkldnn.flags(enabled=self.name != "no-mkldnn")
        with mkldnn, autocast(self.x.device, self.amp):
            z = self.fn(self.x)
        loss = (z.float() * self.target).sum()  # a fixed random direction: gradients of a useful size
        for p in self.model.parameters():
            p.grad = None
        loss.backward()

    def grads(self) -> list[torch.Tensor]:
        return [p.grad.detach().float().clone() for p in self.model.parameters() if p.grad is not None]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args, device: torch.device | None = None) -> dict:
    """Time ``args.variants`` (``rounds``, ``batch_size``) on ``device`` (default CPU; bench_gpu.py passes CUDA)."""
    device = device or torch.device("cpu")
    torch.manual_seed(0)
    x = torch.randn(2 * args.batch_size, 1, 28, 28).to(device)  # (2B, C, S, S): two views of B images
    amp = resolve_amp(getattr(args, "amp", True), device)  # bf16 autocast where instdisc train would use it
    variants = [Variant(n, x, amp) for n in args.variants]
    for v in variants:  # warm-up
        v.step()
    ref = None
    diffs = {}
    for v in variants:
        v.step()
        g = v.grads()
        if ref is None:
            ref = g
        scale = max(float(r.abs().max()) for r in ref)
        diffs[v.name] = max(float((a - b).abs().max()) for a, b in zip(g, ref)) / scale
    times = {v.name: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            _sync(device)
            t0 = time.perf_counter()
            v.step()
            _sync(device)
            times[v.name].append((time.perf_counter() - t0) * 1000)
    base = statistics.median(times[variants[0].name])
    rows = []
    for v in variants:
        ms = statistics.median(times[v.name])
        rows.append({"variant": v.name, "ms": ms, "min_ms": min(times[v.name]), "max_ms": max(times[v.name]),
                     "speedup": base / ms, "compile_s": v.compile_s, "grad_rel_diff": diffs[v.name]})
    return {"rows": rows, "amp": amp, "rounds": args.rounds, "threads": torch.get_num_threads(),
            "views": int(x.shape[0]), "device": str(device)}


def table(res: dict) -> str:
    lines = [f"encoder + head forward + backward on {res.get('device', 'cpu')}, {res['views']} views of 1x28x28, "
             f"{'bf16 autocast' if res['amp'] else 'float32'}"
             f", {res['threads']} threads, median of {res['rounds']} interleaved rounds",
             f"{'variant':<14}{'ms':>9}{'min':>9}{'max':>9}{'speed-up':>10}{'compile s':>11}{'grad diff':>11}"]
    for r in res["rows"]:
        cs = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-"
        lines.append(f"{r['variant']:<14}{r['ms']:>9.1f}{r['min_ms']:>9.1f}{r['max_ms']:>9.1f}{r['speedup']:>9.2f}x"
                     f"{cs:>11}{r['grad_rel_diff']:>11.1e}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=256, help="images per step (x 2 views)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    type=lambda s: [v for v in s.split(",") if v], help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--no-amp", dest="amp", action="store_false",
                    help="float32 even where bf16 autocast is available (its gradients differ in bf16 rounding)")
    ap.add_argument("--json-out", default=str(_machine.REPO / "benchmarks" / "results" / "bench_encoder_variants.json"))
    args = ap.parse_args()
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants or args.variants[0] != "eager":
        ap.error(f"--variants: the first must be eager, the others of {', '.join(VARIANTS)}")
    res = run(args)
    print(table(res))
    args.variants = ",".join(args.variants)
    path = _machine.write_json(args.json_out, {"machine": _machine.machine_info(), "argv": vars(args),
                                               "command": _machine.command_line("bench_encoder_variants.py", args),
                                               **res})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
