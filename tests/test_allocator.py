"""instdisc.allocator: glibc's mallopt is called with the documented values, and freed memory is reused."""
import platform
import subprocess
import sys

import pytest

from instdisc import allocator


class FakeLibc:
    def __init__(self, answer=1):
        self.calls, self.answer = [], answer

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.answer


def test_sets_the_mmap_threshold_then_the_trim_threshold():
    libc = FakeLibc()
    assert allocator.keep_freed_memory(libc=libc) is True
    assert libc.calls == [(-3, 32 << 20), (-1, 512 << 20)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    libc = FakeLibc()
    assert allocator.keep_freed_memory(64 << 20, libc=libc) and libc.calls[1] == (-1, 64 << 20)


def test_a_refused_value_is_reported():
    assert allocator.keep_freed_memory(libc=FakeLibc(answer=0)) is False


def test_environment_turns_it_off(monkeypatch):
    monkeypatch.setenv(allocator.ENV_OFF, "0")
    libc = FakeLibc()
    assert allocator.keep_freed_memory(libc=libc) is False and libc.calls == []


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert allocator.keep_freed_memory() is False


_LOOP = """
import resource, sys, torch
from instdisc import allocator
from instdisc.data.batch_aug import BatchAugment
torch.set_num_threads(1)
print(allocator.keep_freed_memory() if sys.argv[1] == "keep" else "default")
aug = BatchAugment(channels=3, image_size=64, mean=(0.5,) * 3, std=(0.25,) * 3)
data = torch.randint(0, 256, (1024, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
views, faults = [], []
for step in range(12):  # the loop's pattern: gather a batch, two views kept until the next step
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = data.index_select(0, torch.randperm(1024, generator=torch.Generator().manual_seed(step))[:256])
    views = [aug(x, torch.Generator().manual_seed(step)) for _ in range(2)]
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[-6:]) // 6)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_training_input_reuses_freed_memory():
    """A fresh process that calls it runs the cache path's step pattern (a gathered batch, two BatchAugment views
    kept until the next step) without faulting its tensors in afresh once warm: < 1,000 minor faults (4 MiB) a
    step for ~25 MiB of tensors a step (measured 0-130; glibc's default returned them to the kernel and faulted
    2,500-3,400 pages in again each step)."""
    out = subprocess.run([sys.executable, "-c", _LOOP, "keep"], capture_output=True, text=True, check=True).stdout
    applied, per_step = out.split()
    assert applied == "True" and int(per_step) < 1000, out
