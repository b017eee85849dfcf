"""A safe checker for arithmetic expressions (the Countdown task): its own tokenizer and recursive-descent
parser over integers, + - * /, unary minus and parentheses, evaluated exactly with Fractions. Nothing
is ever passed to `eval`, and the input is bounded (length, digits per number, nesting depth), so any
string a model writes is checked in microseconds or refused.
"""
import re
from dataclasses import dataclass
from fractions import Fraction

MAX_CHARS = 200
MAX_DIGITS = 6
MAX_DEPTH = 32
_TOKEN = re.compile(r"\s*(?:(\d+)|(.))")


class ExpressionError(ValueError):
    pass


@dataclass
class Evaluated:
    value: Fraction
    numbers: list[int]
    """The integer literals, in order of appearance."""


def _tokens(text: str) -> list[str]:
    out = []
    for number, other in _TOKEN.findall(text):
        if number:
            if len(number) > MAX_DIGITS:
                raise ExpressionError(f"number with more than {MAX_DIGITS} digits")
            out.append(number)
        elif other in "+-*/()":
            out.append(other)
        elif not other.isspace():
            raise ExpressionError(f"character {other!r} is not allowed")
    return out


class _Parser:
    def __init__(self, tokens: list[str]):
        self.tokens, self.i, self.numbers = tokens, 0, []

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self):
        tok = self.peek()
        self.i += 1
        return tok

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            value = value + self.term(depth) if self.take() == "+" else value - self.term(depth)
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            op, rhs = self.take(), self.factor(depth)
            if op == "/" and rhs == 0:
                raise ExpressionError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def factor(self, depth: int) -> Fraction:
        if depth > MAX_DEPTH:
            raise ExpressionError(f"nested deeper than {MAX_DEPTH}")
        tok = self.take()
        if tok == "-":
            return -self.factor(depth + 1)
        if tok == "(":
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise ExpressionError("unbalanced parentheses")
            return value
        if tok is not None and tok.isdigit():
            self.numbers.append(int(tok))
            return Fraction(int(tok))
        raise ExpressionError(f"unexpected {tok!r}" if tok else "unexpected end")


def evaluate(text: str) -> Evaluated:
    """The exact value of an arithmetic expression and the numbers it uses; ExpressionError if it is not one."""
    if len(text) > MAX_CHARS:
        raise ExpressionError(f"longer than {MAX_CHARS} characters")
    parser = _Parser(_tokens(text))
    value = parser.expr(0)
    if parser.peek() is not None:
        raise ExpressionError(f"unexpected {parser.peek()!r}")
    return Evaluated(value, parser.numbers)


def reaches_target(text: str, numbers: list[int], target: int) -> bool:
    """True iff `text` is an expression using each of `numbers` exactly once whose value is `target`.
    A trailing "= <target>" is allowed (models often write the equation)."""
    left, sep, right = text.partition("=")
    if sep and right.strip() != str(target):
        return False
    try:
        result = evaluate(left)
    except ExpressionError:
        return False
    return sorted(result.numbers) == sorted(numbers) and result.value == target
