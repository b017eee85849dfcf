"""Verifiable task families, generated locally from a seed (no download), each with difficulty levels,
a reference answer that a rule can check, and a step-by-step trace written by a program (for cold-start
SFT data).

- `arithmetic`: multi-digit addition, subtraction, multiplication; the answer is exact.
- `countdown`: reach a target with given numbers, each used exactly once, with + - * / and parentheses;
  any correct expression counts (checked by `dsv3.rl.expression`, never `eval`).
- `linear_equation`: solve a*x + b = c*x + d for x; answers are integers or fractions, checked as
  mathematical expressions (so "x = -7/2", "-3.5" and "\\frac{-7}{2}" all count).

Splits. A problem is held out or not by a hash of its canonical text, so train and held-out sets never
share a problem, whatever the seed, the difficulty or the number drawn.
"""
import functools
import hashlib
import random
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable

SPLITS = ("train", "held_out")


@dataclass(frozen=True)
class Problem:
    family: str
    difficulty: int
    question: str
    answer: str
    """Reference answer (the gold text for math families; one solution for countdown)."""
    trace: str
    """Step-by-step reasoning, written by the generator, that reaches `answer`."""
    data: dict = field(default_factory=dict, hash=False, compare=False)
    """What a checker needs besides the answer (countdown: numbers and target)."""

    @property
    def key(self) -> str:
        """Canonical identity: two problems with the same key are the same problem."""
        return f"{self.family}|{self.question}"


def split_of(problem: Problem, held_out_fraction: float) -> str:
    h = int(hashlib.sha256(problem.key.encode()).hexdigest()[:12], 16) / 16**12
    return "held_out" if h < held_out_fraction else "train"


# -- arithmetic -----------------------------------------------------------------------------------------------
def _digits(rng: random.Random, n: int) -> int:
    return rng.randint(10 ** (n - 1) if n > 1 else 0, 10 ** n - 1)


def _column_add(a: int, b: int) -> list[str]:
    steps, carry, sa, sb = [], 0, str(a)[::-1], str(b)[::-1]
    for i in range(max(len(sa), len(sb))):
        x, y = int(sa[i]) if i < len(sa) else 0, int(sb[i]) if i < len(sb) else 0
        s = x + y + carry
        step = f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={s}, write {s % 10}"
        steps.append(step + (", carry 1" if s >= 10 else ""))
        carry = s // 10
    if carry:
        steps.append("write the carry 1")
    return steps


def _column_sub(a: int, b: int) -> list[str]:
    steps, borrow, sa, sb = [], 0, str(a)[::-1], str(b)[::-1]
    for i in range(len(sa)):
        x, y = int(sa[i]) - borrow, int(sb[i]) if i < len(sb) else 0
        borrow = 1 if x < y else 0
        steps.append(f"{x + 10 * borrow}-{y}={x + 10 * borrow - y}" + (", borrow 1" if borrow else ""))
    return steps


def arithmetic(rng: random.Random, difficulty: int) -> Problem:
    """Difficulty d: operands of d digits (+, -) and products of d-digit by ceil(d/2)-digit numbers."""
    op = rng.choice("+-*") if difficulty >= 2 else rng.choice("+-")
    if op == "*":
        a, b = _digits(rng, difficulty), _digits(rng, (difficulty + 1) // 2)
        partial = [(int(d) * 10 ** i) for i, d in enumerate(str(b)[::-1])]
        lines = [f"{a}*{p}={a * p}" for p in partial if p]
        lines.append(f"sum: {' + '.join(str(a * p) for p in partial if p) or '0'} = {a * b}")
        value = a * b
    else:
        a, b = _digits(rng, difficulty), _digits(rng, difficulty)
        if op == "-" and b > a:
            a, b = b, a
        lines = _column_add(a, b) if op == "+" else _column_sub(a, b)
        value = a + b if op == "+" else a - b
    return Problem("arithmetic", difficulty, f"What is {a} {op} {b}?", str(value),
                   "; ".join(lines) + f". So {a} {op} {b} = {value}.")


# -- countdown ------------------------------------------------------------------------------------------------
def countdown(rng: random.Random, difficulty: int) -> Problem:
    """Difficulty d: d + 2 numbers (1..9 at level 1, up to 25 above, plus one of 25/50/75/100 from level 3);
    the target is the value of a random expression using every number once, a positive integer."""
    n = difficulty + 2
    while True:
        pool = [rng.randint(1, 9 if difficulty == 1 else 25) for _ in range(n)]
        if difficulty >= 3:
            pool[0] = rng.choice([25, 50, 75, 100])
        items = [(Fraction(v), str(v)) for v in pool]
        steps = []
        while len(items) > 1:
            i, j = rng.sample(range(len(items)), 2)
            (x, ex), (y, ey) = items[i], items[j]
            op = rng.choice("+-*/")
            if op == "-" and x < y:
                (x, ex), (y, ey) = (y, ey), (x, ex)
            if op == "/" and (y == 0 or x % y != 0):
                op = "+"
            z = {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else None}[op]
            steps.append(f"{x} {op} {y} = {z}")
            items = [it for k, it in enumerate(items) if k not in (i, j)] + [(z, f"({ex} {op} {ey})")]
        value, expr = items[0]
        if value.denominator == 1 and 0 < value <= 1000:
            break
    expr = expr[1:-1] if expr.startswith("(") else expr
    numbers = sorted(pool)
    question = f"Make {int(value)} from the numbers {numbers} with + - * / and parentheses, each number used once."
    return Problem("countdown", difficulty, question, expr, "; ".join(steps) + f". So {expr} = {int(value)}.",
                   {"numbers": numbers, "target": int(value)})


# -- linear equations ------------------------------------------------------------------------------------------
def _fraction_text(v: Fraction) -> str:
    return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"


def _side(coef: int, const: int) -> str:
    x = "" if coef == 0 else ("x" if coef == 1 else "-x" if coef == -1 else f"{coef}x")
    if not x:
        return str(const)
    return x if const == 0 else f"{x} {'+' if const > 0 else '-'} {abs(const)}"


def linear_equation(rng: random.Random, difficulty: int) -> Problem:
    """Difficulty 1: a*x + b = c with a whole solution; 2: negative values; 3: x on both sides;
    4 and up: fractional solutions and larger coefficients."""
    span = 9 if difficulty <= 2 else 12 * (difficulty - 1)
    while True:
        a = rng.randint(1 if difficulty == 1 else -span, span)
        c = rng.randint(-span, span) if difficulty >= 3 else 0
        if a == c or a == 0:
            continue
        if difficulty >= 4:
            x = Fraction(rng.randint(-span, span), rng.randint(1, 6))
        else:
            x = Fraction(rng.randint(0 if difficulty == 1 else -span, span))
        b = rng.randint(0 if difficulty == 1 else -span, span)
        d = (a - c) * x + b
        if d.denominator == 1:
            break
    d = int(d)
    question = f"Solve for x: {_side(a, b)} = {_side(c, d)}"
    k = a - c
    steps = []
    if c:
        steps.append(f"move {_side(c, 0)} to the left: {_side(k, b)} = {d}")
    if b:
        steps.append(f"{'subtract' if b > 0 else 'add'} {abs(b)} on both sides: {_side(k, 0)} = {d - b}")
    if k != 1:
        steps.append(f"divide both sides by {k}: x = {_fraction_text(Fraction(d - b, k))}")
    answer = _fraction_text(x)
    return Problem("linear_equation", difficulty, question, answer, "; ".join(steps) + f". So x = {answer}.")


FAMILIES: dict[str, Callable[[random.Random, int], Problem]] = {
    "arithmetic": arithmetic, "countdown": countdown, "linear_equation": linear_equation}
MAX_DIFFICULTY = 5


class NotEnoughProblems(ValueError):
    """A family has fewer distinct problems of a difficulty and split than were asked (the easy levels'
    spaces are small: arithmetic at difficulty 1 has ~150 training problems)."""

    def __init__(self, family: str, split: str, difficulty: int, found: int, asked: int):
        super().__init__(f"only {found} distinct {split} problems of {family} at difficulty {difficulty} "
                         f"found, {asked} asked")
        self.family, self.split, self.difficulty, self.found, self.asked = family, split, difficulty, found, asked


def problems(family: str, split: str, difficulty: int, n: int, seed: int = 0,
             held_out_fraction: float = 0.1) -> list[Problem]:
    """n distinct problems of one family, difficulty and split, drawn from a generator seeded by
    (seed, family, difficulty, split). The same arguments always give the same list (kept: a launcher
    checks the counts before the run draws the same problems)."""
    return list(_problems(family, split, difficulty, n, seed, held_out_fraction))


@functools.lru_cache(maxsize=64)
def _problems(family: str, split: str, difficulty: int, n: int, seed: int, held_out_fraction: float
              ) -> tuple[Problem, ...]:
    if family not in FAMILIES:
        raise ValueError(f"task family {family!r}: must be one of {', '.join(FAMILIES)}")
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: must be one of {', '.join(SPLITS)}")
    if not 1 <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"difficulty={difficulty}: must be in 1..{MAX_DIFFICULTY}")
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction={held_out_fraction}: must be in (0, 1)")
    rng = random.Random(f"{seed}/{family}/{difficulty}/{split}")
    out, seen, tries = [], set(), 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise NotEnoughProblems(family, split, difficulty, len(out), n)
        p = FAMILIES[family](rng, difficulty)
        if p.key in seen or split_of(p, held_out_fraction) != split:
            continue
        seen.add(p.key)
        out.append(p)
    return tuple(out)


def mixture(families: list[str], difficulties: list[int], split: str, n: int, seed: int = 0,
            held_out_fraction: float = 0.1) -> list[Problem]:
    """n problems spread evenly over families x difficulties, interleaved (deterministic). Raises
    NotEnoughProblems when a cell has fewer than its share."""
    cells = [(f, d) for f in families for d in difficulties]
    per = -(-n // len(cells))
    pools = [problems(f, split, d, per, seed, held_out_fraction) for f, d in cells]
    return [pools[i % len(cells)][i // len(cells)] for i in range(n)]
