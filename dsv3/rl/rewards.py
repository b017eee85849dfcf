"""Rule-based rewards (R1 report §2.2.2) and their weighted sum, composed from config.

- `accuracy`: 1 if the content of the one <answer>...</answer> block is correct, else 0. Only that
  field is read: text outside it, several answer blocks, unbalanced tags or an empty answer score 0.
  Math families compare with `math-verify` (any equivalent form: "x = 5", "\\frac{-7}{2}" vs "-3.5"),
  after an exact fast path for plain numbers; countdown uses the safe expression checker.
- `format`: 1 if the whole completion is <think>...</think> then <answer>...</answer>, each tag once.
- `overlong`: DAPO's soft overlong punishment: 0 up to max_tokens - buffer_tokens, then linearly down
  to -1 at max_tokens, -1 beyond or when the completion was cut off.
- `repetition`: -(share of repeated word n-grams) x scale (a loop of the same phrase tends to -scale).
"""
import inspect
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

from dsv3.config.post_training import RewardTerm
from dsv3.rl.expression import reaches_target
from dsv3.rl.tasks import Problem
from dsv3.rl.template import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN

MAX_ANSWER_CHARS = 100   # longer answers are wrong without being parsed: no gold answer here is near it
MATH_TIMEOUT_S = 1       # math-verify's own per-call timeout (it is signal based: main thread only)


@dataclass
class Rollout:
    """What a reward sees of one sample: the completion text and its problem (never the gold text of
    the completion's reasoning, only the answer field is compared)."""

    completion: str
    problem: Problem
    n_tokens: int = 0
    truncated: bool = False
    """The completion ended at the token limit, not on a stop."""


def answer_field(text: str) -> str | None:
    """The content of the single <answer>...</answer> block, stripped; None if there is not exactly one
    well-ordered pair of tags or the content is empty."""
    if text.count(ANSWER_OPEN) != 1 or text.count(ANSWER_CLOSE) != 1:
        return None
    start, end = text.index(ANSWER_OPEN) + len(ANSWER_OPEN), text.index(ANSWER_CLOSE)
    if end < start:
        return None
    content = text[start:end].strip()
    return content or None


_PLAIN_NUMBER = re.compile(r"^\s*(?:x\s*=\s*)?(-?\d{1,30}(?:\.\d{1,30})?(?:\s*/\s*\d{1,30})?)\s*$")


def _plain_number(text: str) -> Fraction | None:
    m = _PLAIN_NUMBER.match(text)
    return Fraction(m.group(1).replace(" ", "")) if m else None


def math_equal(answer: str, gold: str) -> bool:
    """Is `answer` mathematically the gold answer? Plain numbers exactly, anything else by math-verify."""
    if len(answer) > MAX_ANSWER_CHARS:
        return False
    a, g = _plain_number(answer), _plain_number(gold)
    if a is not None and g is not None:
        return a == g
    from math_verify import parse, verify

    try:
        return bool(verify(parse(gold, parsing_timeout=MATH_TIMEOUT_S), parse(answer, parsing_timeout=MATH_TIMEOUT_S),
                           timeout_seconds=MATH_TIMEOUT_S))
    except Exception:  # math-verify raises on what it cannot parse or compare: not a correct answer
        return False


def accuracy(r: Rollout) -> float:
    answer = answer_field(r.completion)
    if answer is None:
        return 0.0
    if r.problem.family == "countdown":
        return float(reaches_target(answer, r.problem.data["numbers"], r.problem.data["target"]))
    return float(math_equal(answer, r.problem.answer))


_FORMAT = re.compile(rf"^\s*{re.escape(THINK_OPEN)}(.*?){re.escape(THINK_CLOSE)}\s*"
                     rf"{re.escape(ANSWER_OPEN)}(.*?){re.escape(ANSWER_CLOSE)}\s*$", re.DOTALL)


def format_reward(r: Rollout) -> float:
    m = _FORMAT.match(r.completion)
    if m is None or any(r.completion.count(tag) != 1 for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)):
        return 0.0
    return float(bool(m.group(2).strip()))


def overlong(r: Rollout, max_tokens: int, buffer_tokens: int) -> float:
    if r.truncated or r.n_tokens > max_tokens:
        return -1.0
    start = max_tokens - buffer_tokens
    return 0.0 if r.n_tokens <= start else (start - r.n_tokens) / buffer_tokens


def repetition(r: Rollout, ngram: int = 3, scale: float = 1.0) -> float:
    words = r.completion.split()
    grams = [tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1)]
    if not grams:
        return 0.0
    return -scale * (1 - len(set(grams)) / len(grams))


REWARDS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy, "format": format_reward, "overlong": overlong, "repetition": repetition}


class WeightedReward:
    """sum_i weight_i * reward_i(rollout), from a list of RewardTerms; checked when built."""

    def __init__(self, terms: list[RewardTerm]):
        if not terms:
            raise ValueError("rewards: at least one reward term is needed")
        self.terms = []
        for i, t in enumerate(terms):
            if t.name not in REWARDS:
                raise ValueError(f"rewards[{i}].name={t.name!r}: must be one of {', '.join(REWARDS)}")
            fn = REWARDS[t.name]
            accepted = list(inspect.signature(fn).parameters)[1:]
            unknown = sorted(set(t.params) - set(accepted))
            if unknown:
                raise ValueError(f"rewards[{i}] ({t.name}).params: unknown {unknown}; accepted: {accepted or 'none'}")
            try:
                inspect.signature(fn).bind(None, **t.params)
            except TypeError as e:
                raise ValueError(f"rewards[{i}] ({t.name}).params={dict(t.params)}: {e}") from None
            self.terms.append((t.name, float(t.weight), dict(t.params)))
        names = [n for n, _, _ in self.terms]
        if len(set(names)) != len(names):
            raise ValueError(f"rewards: a name appears twice in {names}")

    def __call__(self, rollouts: list[Rollout]) -> tuple[list[float], dict[str, list[float]]]:
        """(total per rollout, each term's unweighted value per rollout)."""
        parts = {name: [REWARDS[name](r, **params) for r in rollouts] for name, _, params in self.terms}
        totals = [sum(w * parts[name][i] for name, w, _ in self.terms) for i in range(len(rollouts))]
        return totals, parts
