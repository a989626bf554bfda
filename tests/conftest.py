"""Shared fixtures."""

import pytest

import minflux.linear


@pytest.fixture
def reference_kernels(monkeypatch):
    """Runs every minflux linear through F.linear, the reference models' GEMM kernel.

    A component parity test asks whether our model computes the reference's function. Its 1e-5 tolerance is about
    10 float32 ulps at the tiny models' output scale (~10), below either kernel's own error against float64 there
    (2-4e-5, tests/test_linear.py), so it holds only while both sides round alike, which two different GEMM
    kernels (oneDNN vs the BLAS behind F.linear) do not. The tiny models' matrices are below
    minflux.linear.MIN_MACS and take F.linear anyway; this makes that a stated condition of the test rather than
    an accident of size. The oneDNN kernel's own accuracy is tests/test_linear.py's job."""
    monkeypatch.setattr(minflux.linear, "ONEDNN", False)
