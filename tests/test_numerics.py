"""flush_denormals: subnormal floats become zero inside the block only."""

from __future__ import annotations

import pytest
import torch

from dualedit.numerics import cpu_threads, flush_denormals

SUBNORMAL = 1e-40  # below float32's smallest normal, 1.18e-38


def test_subnormals_flush_inside_only():
    x = torch.tensor([SUBNORMAL], dtype=torch.float32)
    assert x.item() != 0.0
    with flush_denormals() as supported:
        if not supported:
            pytest.skip("this CPU cannot flush subnormals (needs SSE3 on x86)")
        assert (x * 1.0).item() == 0.0
    assert (torch.tensor([SUBNORMAL]) * 1.0).item() != 0.0


def test_cpu_threads_sets_and_restores():
    before = torch.get_num_threads()
    with cpu_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with cpu_threads(None):
        assert torch.get_num_threads() == before
