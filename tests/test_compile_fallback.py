"""A host where torch.compile cannot build its kernels (no C compiler, say) still trains: the
heads' compiled elementwise math falls back to eager once, with one warning."""
from __future__ import annotations

import warnings

import pytest
import torch

from sf2dist.heads import chunked


def test_a_failing_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    attempts = []

    def broken_compile(fn, **kwargs):
        def compiled(*args):
            attempts.append(fn.__name__)
            raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")
        return compiled

    def double(x):
        return 2 * x

    def square(x):
        return x * x

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(chunked, "_COMPILED", {})
    monkeypatch.setattr(chunked, "_compile_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = torch.arange(3.0)
        assert torch.equal(chunked.elementwise(double, True)(x), 2 * x)
        assert torch.equal(chunked.elementwise(double, True)(x), 2 * x)
        assert torch.equal(chunked.elementwise(square, True)(x), x * x)
    assert attempts == ["double", "square"]  # each tried once, never again after failing
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "Failed to find C compiler" in messages[0] and "eagerly" in messages[0]


def test_an_error_of_the_function_itself_still_raises(monkeypatch):
    monkeypatch.setattr(chunked, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # "compiled" = the function itself

    def bad(x):
        return x @ torch.ones(5)

    monkeypatch.setattr(chunked, "_compile_warned", True)
    with pytest.raises(RuntimeError, match="inconsistent tensor size"):
        chunked.elementwise(bad, True)(torch.ones(3))
