"""CPU numerics settings shared by the training loops and the demo.

`cpu_threads(n)` sets torch's CPU thread count inside a block and restores it after. On a CPU
shared with another job, one thread avoids threads spin-waiting on each other (seen here:
evaluation 16x slower with 2 threads beside a 1-thread job).

`flush_denormals()` makes the CPU treat subnormal floats as zero while inside. Training the small
VLMs drives some activations and Adam states into the subnormal range, and x86 CPUs compute on
subnormals many times slower: measured on this project's 2-core CPU, BLIP-2's vision warm-up fell
from 6.5 to 0.4-0.7 steps/s for hundreds of steps without it, and stayed at 6.5 with it. The
values lost are below 1.2e-38 in float32, far under anything the models resolve.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def flush_denormals() -> Iterator[bool]:
    """Flush subnormal floats to zero inside the block; yields whether the CPU supports it.

    torch has no getter for this flag, so on exit it is switched off again (its default).

    Example:
        >>> with flush_denormals():
        ...     train()
    """
    supported = torch.set_flush_denormal(True)
    try:
        yield supported
    finally:
        if supported:
            torch.set_flush_denormal(False)


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to `threads` inside the block (None: left as they are).

    Example:
        >>> with cpu_threads(1):
        ...     pretrain()
    """
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
