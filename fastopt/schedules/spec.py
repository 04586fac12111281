"""Read a schedule written as Python call syntax, e.g. "WSD(peak=3e-4, total=10000, decay=0.2)", without eval.

The text is parsed with `ast` and only this grammar is accepted: calls of registered schedule classes (by bare
name) with positional or keyword arguments; number, string, None and boolean literals (with a sign); lists and
tuples; and `*` between numbers and schedules (`0.5 * Cosine(...)`). `repr(sched)` is always valid input.
"""

from __future__ import annotations

import ast
import numbers

from .base import Schedule, schedule_types


def parse(text: str) -> Schedule:
    """The schedule that `text` spells; ValueError (naming the offending part) for anything else."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as error:
        raise ValueError(f"schedule spec: invalid syntax in {text!r}: {error.msg}") from None
    result = _build(tree.body)
    if not isinstance(result, Schedule):
        raise ValueError(f"schedule spec: {text!r} is not a schedule")
    return result


def _build(node: ast.expr):
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (bool, int, float, str))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _build(node.operand)
        if isinstance(operand, numbers.Real) and not isinstance(operand, bool):
            return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_build(element) for element in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        left, right = _build(node.left), _build(node.right)
        if all(isinstance(x, (Schedule, numbers.Real)) and not isinstance(x, bool) for x in (left, right)):
            return left * right
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        cls = schedule_types().get(node.func.id)
        if cls is None:
            raise ValueError(f"schedule spec: unknown schedule {node.func.id!r}; known: {sorted(schedule_types())}")
        if any(isinstance(arg, ast.Starred) for arg in node.args) or any(kw.arg is None for kw in node.keywords):
            raise ValueError(f"schedule spec: *args and **kwargs are not allowed: {ast.unparse(node)!r}")
        names = [kw.arg for kw in node.keywords]
        if len(set(names)) != len(names):
            raise ValueError(f"schedule spec: a keyword is repeated in {ast.unparse(node)!r}")
        args = [_build(arg) for arg in node.args]
        kwargs = {kw.arg: _build(kw.value) for kw in node.keywords}
        return cls(*args, **kwargs)
    raise ValueError(
        "schedule spec: only schedule calls, numbers, strings, lists and '*' are allowed, "
        f"got {ast.unparse(node)!r}"
    )
