"""Task families: reproducible from a seed, correct reference answers and traces, disjoint splits."""
import re
from fractions import Fraction

import pytest

from dsv3.rl.expression import evaluate, reaches_target
from dsv3.rl.tasks import FAMILIES, MAX_DIFFICULTY, mixture, problems, split_of


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_same_seed_same_problems_other_seed_others(family):
    a = problems(family, "train", 2, 20, seed=1)
    assert a == problems(family, "train", 2, 20, seed=1)
    assert a != problems(family, "train", 2, 20, seed=2)
    assert len({p.key for p in a}) == 20


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_and_held_out_never_share_a_problem(family):
    for d in (1, 3):
        train = {p.key for s in range(3) for p in problems(family, "train", d, 40, seed=s)}
        held = {p.key for s in range(3) for p in problems(family, "held_out", d, 10, seed=s)}
        assert train and held and not train & held
        assert all(split_of(p, 0.1) == "held_out" for p in problems(family, "held_out", d, 10))


def independent_answer(p):
    """The reference answer recomputed from the question text alone."""
    if p.family == "arithmetic":
        a, op, b = re.match(r"What is (\d+) ([-+*]) (\d+)\?", p.question).groups()
        return str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])
    if p.family == "linear_equation":
        lhs, rhs = p.question.removeprefix("Solve for x: ").split(" = ")

        def coeffs(side):  # (coefficient of x, constant)
            side = side.replace(" ", "").replace("-", "+-")
            c = k = 0
            for term in filter(None, side.split("+")):
                if term.endswith("x"):
                    c += int(term[:-1]) if term[:-1] not in ("", "-") else (1 if term[:-1] == "" else -1)
                else:
                    k += int(term)
            return c, k
        (a, b), (c, d) = coeffs(lhs), coeffs(rhs)
        x = Fraction(d - b, a - c)
        return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"
    return None


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("difficulty", range(1, MAX_DIFFICULTY + 1))
def test_reference_answers_are_right_and_traces_reach_them(family, difficulty):
    for p in problems(family, "train", difficulty, 15, seed=difficulty):
        assert p.difficulty == difficulty
        if family == "countdown":
            assert len(p.data["numbers"]) == difficulty + 2
            assert reaches_target(p.answer, p.data["numbers"], p.data["target"])
            assert evaluate(p.answer).value == p.data["target"]
        else:
            assert p.answer == independent_answer(p), p
        assert p.trace.endswith(f"= {p.answer}.") or p.trace.endswith(f"= {p.data.get('target')}.")


def test_difficulty_makes_problems_harder():
    def digits(d):
        return max(len(str(abs(int(p.answer)))) for p in problems("arithmetic", "train", d, 30))
    assert digits(1) < digits(3) < digits(5)
    assert any("/" in p.answer for p in problems("linear_equation", "train", 4, 30))


def test_mixture_interleaves_families_and_bad_names_are_refused():
    mix = mixture(["arithmetic", "countdown"], [1, 2], "train", 8)
    assert [p.family for p in mix[:4]] == ["arithmetic", "arithmetic", "countdown", "countdown"]
    with pytest.raises(ValueError, match="'sudoku'"):
        problems("sudoku", "train", 1, 1)
    with pytest.raises(ValueError, match="difficulty=9"):
        problems("arithmetic", "train", 9, 1)
    with pytest.raises(ValueError, match="distinct"):
        problems("arithmetic", "held_out", 1, 500)  # there are not 500 one-digit problems to hold out
