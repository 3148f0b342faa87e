"""What the parser fuzzers share: hostile JSON values, and settings that keep CI reproducible and quick."""

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Every kind of JSON value, nested a little: what a corrupt or crafted file can hold where a parser
# expects something else. Integers reach past 64 bits; floats include NaN and the infinities.
SCALARS = st.none() | st.booleans() | st.integers() | st.integers(2**63 - 2, 2**70) | st.floats() | st.text(max_size=8)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

FUZZ_EXAMPLES = 200
# Derandomized: the same examples on every run, so CI is reproducible; the tests reuse their tmp_path per example.
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@st.composite
def mutated(draw, value):
    """`value` with one node somewhere in it replaced by a hostile value, or removed."""
    if isinstance(value, (dict, list)) and value and draw(st.integers(0, 3)):
        keys = list(value) if isinstance(value, dict) else list(range(len(value)))
        key, copy = draw(st.sampled_from(keys)), (dict(value) if isinstance(value, dict) else list(value))
        if draw(st.integers(0, 4)) == 0:
            del copy[key]
        else:
            copy[key] = draw(mutated(value[key]))
        return copy
    return draw(JSON_VALUES | st.sampled_from(["../../etc/passwd", "/etc/passwd", "", 2**32, -1, 0, True, 1.5, 10**30]))
