"""The spec-string parser: the schedule grammar is accepted, everything else is refused without being evaluated."""

import pytest

from fastopt.schedules import WSD, Constant, Cosine, Join, Product, Ramp, parse


def test_reads_keywords_positionals_nesting_and_products():
    assert parse("WSD(peak=3e-4, total=10000, decay=0.2)") == WSD(3e-4, 10000, decay=0.2)
    assert parse(" Cosine(1e-3, 1000, warmup=100, final=1e-5) ") == Cosine(1e-3, 1000, 100, 1e-5)
    joined = Join([Ramp(0.0, 3e-4, 100), Cosine(3e-4, 900)])
    assert parse("Join([Ramp(0.0, 3e-4, 100), Cosine(3e-4, 900)])") == joined
    assert parse("Join(phases=(Constant(+1.0), Constant(2.0)), lengths=[5])") == Join([Constant(1), Constant(2)], [5])
    assert parse("0.5 * WSD(3e-4, 1000)") == Product([0.5, WSD(3e-4, 1000)])


def test_validation_errors_come_through():
    with pytest.raises(ValueError, match="Cosine: peak must be >= 0, got -1"):
        parse("Cosine(peak=-1, total=10)")


@pytest.mark.parametrize(
    "text, message",
    [
        ("__import__('os').system('echo hacked')", "only schedule calls, numbers, strings, lists and '*' are allowed"),
        ("os.system('ls')", "only schedule calls"),
        ("Foo(1)", "unknown schedule 'Foo'"),
        ("print('x')", "unknown schedule 'print'"),
        ("WSD(**{'peak': 1.0, 'total': 10})", "*args and **kwargs are not allowed"),
        ("WSD(*[1.0, 10])", "*args and **kwargs are not allowed"),
        ("(lambda: 1)()", "only schedule calls"),
        ("WSD(1.0, 10)[0]", "only schedule calls"),
        ("WSD(1.0, 10, shape='a' * 10)", "only schedule calls"),
        ("WSD(1.0, 2 ** 10)", "only schedule calls"),
        ("WSD(1.0, total)", "only schedule calls"),
        ("WSD(peak=1.0, peak=2.0, total=10)", "a keyword is repeated"),
        ("1.0", "is not a schedule"),
        ("WSD(1.0,", "invalid syntax"),
    ],
)
def test_refuses_anything_else(text, message, capfd):
    with pytest.raises(ValueError) as raised:
        parse(text)
    assert message in str(raised.value)
    assert "hacked" not in capfd.readouterr().out
