"""Rejection sampling (R1 report §2.3.3): of the samples a checkpoint draws for a problem, keep those a
rule accepts — complete (not cut at the token budget), correct (the accuracy reward), in the template
(the format reward), readable (few repeated word 3-grams) — and distinct, at most a few per problem.
What is kept is SFT data: the next model, or a smaller dense student (distillation), learns from it."""
from dataclasses import asdict, dataclass

from dsv3.config.post_training import RejectionConfig
from dsv3.generate import Completion
from dsv3.rl.rewards import Rollout, accuracy, format_reward, repetition
from dsv3.rl.tasks import Problem
from dsv3.rl.template import r1_completion


@dataclass
class Trace:
    """One line of the output JSONL: `prompt` is the question (launch/sft.py applies the template)."""

    prompt: str
    completion: str
    family: str
    difficulty: int
    answer: str


def select(problem: Problem, completions: list[Completion], cfg: RejectionConfig, counts: dict) -> list[Trace]:
    """The kept samples of one problem, in sampling order; `counts` tallies why the others were dropped."""
    kept, seen = [], set()
    for c in completions:
        r = Rollout(c.text, problem, len(c.tokens), c.finish_reason == "length")
        if r.truncated:
            why = "truncated"
        elif cfg.require_correct and not accuracy(r):
            why = "wrong"
        elif cfg.require_format and not format_reward(r):
            why = "format"
        elif -repetition(r, ngram=3) > cfg.max_repetition:
            why = "repetitive"
        elif " ".join(c.text.split()) in seen:
            why = "duplicate"
        elif len(kept) >= cfg.max_per_problem:
            why = "over_max_per_problem"
        else:
            seen.add(" ".join(c.text.split()))
            kept.append(Trace(problem.question, c.text, problem.family, problem.difficulty, problem.answer))
            continue
        counts[why] = counts.get(why, 0) + 1
    return kept


def gold_trace(problem: Problem) -> Trace:
    """The problem answered with its gold answer alone, no reasoning: the baseline a distilled student
    must beat."""
    return Trace(problem.question, r1_completion("", problem.answer), problem.family, problem.difficulty,
                 problem.answer)


def as_json(trace: Trace) -> dict:
    return asdict(trace)
