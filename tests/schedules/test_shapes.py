"""Each shape runs from a (p = 0) to b (p = 1), and its float and numpy forms agree."""

import math

import numpy as np
import pytest

from fastopt.schedules.shapes import SHAPES


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("a, b", [(3.0, 0.5), (0.5, 3.0)])
def test_endpoints_and_vectorized_form(name, a, b):
    shape = SHAPES[name]
    assert shape(a, b, 0.0, math) == pytest.approx(a, rel=1e-15)
    assert shape(a, b, 1.0, math) == pytest.approx(b, rel=1e-15)
    p = np.linspace(0.0, 1.0, 101)
    np.testing.assert_allclose(shape(a, b, p, np), [shape(a, b, float(x), math) for x in p], rtol=1e-14)
    values = shape(a, b, p, np)
    assert np.all(np.diff(values) < 0) if a > b else np.all(np.diff(values) > 0)  # monotone between the ends
