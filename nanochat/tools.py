"""
The calculator tool: what runs between <|python_start|> and <|python_end|> during generation.

Notable:
- never Python's eval: the expression is parsed with `ast` and evaluated by walking the tree here, so
  only what this file allows can run. Allowed: int, float and str literals; + - * / // % ** and unary
  + -; parentheses; len(s); and a few str methods (s.count("r"), s.upper(), ...) called on a string.
  Everything else is rejected: names, attributes (dunders included), other calls, subscripts,
  comprehensions, lambdas, f-strings, comparisons, statements (imports do not even parse in "eval" mode).
- every operation that could blow up is bounded before it runs: integer results to MAX_INT_BITS bits
  (a power's size is estimated from its operands first, so 9**9**9 costs nothing), strings to
  MAX_STR_LEN characters, the expression itself to MAX_EXPR_LEN characters.
- a wall-time deadline is checked at every node as a last resort; with the bounds above no single
  operation is slow, so no thread or signal is needed (SIGALRM, nanochat's choice, works only in the
  main thread, and generation runs in Ray workers and server threads).
- thousands separators are dropped from numbers ("1,200 * 3", as GSM8K writes them) unless the
  expression holds a string literal, where a comma may be data.
- results print like the training data's tool outputs: ints as ints, integral floats as ints
  (48/2 -> "24"), other floats to 12 significant digits (10/4 -> "2.5", 0.1+0.2 -> "0.3").
"""

import ast
import math
import operator
import re
import time

MAX_EXPR_LEN = 1000
MAX_INT_BITS = 4096  # ~1233 decimal digits, well under Python's 4300-digit str() limit
MAX_STR_LEN = 10_000

STR_METHODS = frozenset({
    "count", "find", "startswith", "endswith", "upper", "lower", "strip", "lstrip", "rstrip",
    "capitalize", "title", "swapcase", "isdigit", "isalpha",
})  # none of them returns more characters than it is given

BINARY_OPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}

THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


class Rejected(Exception):
    """The expression uses something the calculator does not allow, or exceeds a bound."""


def safe_eval(expr: str, timeout_s: float = 1.0) -> str | None:
    """The result of a calculator expression as text, or None if it is rejected, fails or runs out of time."""
    if len(expr) > MAX_EXPR_LEN:
        return None
    if "'" not in expr and '"' not in expr:
        expr = THOUSANDS.sub("", expr)
    try:
        tree = ast.parse(expr.strip(), mode="eval")
        value = _Evaluator(time.monotonic() + timeout_s).eval(tree.body)
    except Exception:  # Rejected, SyntaxError, ZeroDivisionError, OverflowError, RecursionError, ...
        return None  # a failed tool call only means no output is forced; generation goes on
    return format_result(value)


def format_result(value: int | float | str | bool) -> str | None:
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.12g}"
    return str(value)


class _Evaluator:
    def __init__(self, deadline: float):
        self.deadline = deadline

    def eval(self, node: ast.AST) -> int | float | str | bool:
        if time.monotonic() >= self.deadline:
            raise Rejected("out of time")
        if isinstance(node, ast.Constant):
            # exact types: bool is an int subclass, and complex/bytes/None are not calculator values
            if type(node.value) not in (int, float, str):
                raise Rejected(f"literal {node.value!r}")
            return _checked(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPS:
            left, right = self.eval(node.left), self.eval(node.right)
            _check_binary(node.op, left, right)
            return _checked(BINARY_OPS[type(node.op)](left, right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_OPS:
            operand = self.eval(node.operand)
            if isinstance(operand, str):
                raise Rejected("unary operator on a string")
            return UNARY_OPS[type(node.op)](operand)
        if isinstance(node, ast.Call):
            return self._call(node)
        raise Rejected(f"{type(node).__name__} is not allowed")

    def _call(self, node: ast.Call) -> int | str | bool:
        if node.keywords:
            raise Rejected("keyword arguments")
        if any(isinstance(arg, ast.Starred) for arg in node.args):
            raise Rejected("starred arguments")
        func = node.func
        if isinstance(func, ast.Name) and func.id == "len" and len(node.args) == 1:
            value = self.eval(node.args[0])
            if not isinstance(value, str):
                raise Rejected("len of a non-string")
            return len(value)
        if isinstance(func, ast.Attribute) and func.attr in STR_METHODS:
            receiver = self.eval(func.value)
            if not isinstance(receiver, str):  # (1).__add__ and friends never get here: not in STR_METHODS
                raise Rejected(f".{func.attr}() on a {type(receiver).__name__}")
            args = [self.eval(arg) for arg in node.args]
            return getattr(receiver, func.attr)(*args)
        raise Rejected("only len() and a few string methods may be called")


def _check_binary(op: ast.operator, left, right) -> None:
    """Refuse an operation whose result would be too big, before computing it."""
    if isinstance(op, ast.Mod) and isinstance(left, str):
        raise Rejected("printf-style string formatting")
    if isinstance(op, ast.Mult) and (isinstance(left, str) or isinstance(right, str)):
        text, count = (left, right) if isinstance(left, str) else (right, left)
        if isinstance(count, int) and len(text) * max(count, 0) > MAX_STR_LEN:
            raise Rejected("string repetition too long")
    if isinstance(op, ast.Mult) and isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
            raise Rejected("product too large")
    if isinstance(op, ast.Pow) and isinstance(left, int) and isinstance(right, int) and right > 0:
        # |left| ** right has about right * log2|left| bits; 0, 1 and -1 stay small at any power
        if abs(left) > 1 and right * math.log2(abs(left)) > MAX_INT_BITS:
            raise Rejected("power too large")
    if isinstance(op, ast.Pow) and isinstance(right, int) and abs(right) > 10 * MAX_INT_BITS:
        raise Rejected("exponent too large")  # float and negative powers: no big ints, but keep them sane


def _checked(value):
    if type(value) not in (int, float, str, bool):  # e.g. (-8) ** 0.5 is complex
        raise Rejected(f"{type(value).__name__} result")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise Rejected("integer too large")
    if isinstance(value, str) and len(value) > MAX_STR_LEN:
        raise Rejected("string too long")
    return value
