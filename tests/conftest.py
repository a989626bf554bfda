"""Shared fixtures."""

import pytest

import minflux.linear


@pytest.fixture
def reference_kernels(monkeypatch):
    """Runs minflux's linears through F.linear, the GEMM kernel the reference models use.

    A component parity test asks whether our model computes the reference's function; its 1e-5 tolerance is a few
    float32 ulps at the tiny models' output scale (~10). Two different GEMM kernels (oneDNN vs the BLAS behind
    F.linear) legitimately differ by more than that after a few blocks, so with both sides on the same kernel the
    test sees the model's math alone. That the oneDNN kernel is itself as accurate as F.linear is
    tests/test_linear.py's job, and the end-to-end image tests run with the defaults."""
    monkeypatch.setattr(minflux.linear, "ONEDNN", False)
