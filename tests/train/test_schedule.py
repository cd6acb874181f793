import pytest

from tuneforge.train.schedule import lr_factor


def test_warmup_then_cosine_to_floor():
    f = [lr_factor(s, total=100, warmup=10, kind="cosine", min_ratio=0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert f[-1] == pytest.approx(0.1, abs=1e-3)


def test_linear_and_constant():
    assert lr_factor(55, 100, 10, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(80, 100, 10, "constant", 0.0) == 1.0
