"""Rejection sampling's rules (dsv3/rl/rejection.py): what is kept of a problem's samples and why the
rest is dropped; the gold-answer baseline is in the template."""
from dsv3.config.post_training import RejectionConfig
from dsv3.generate import Completion
from dsv3.rl.rejection import gold_trace, select
from dsv3.rl.rewards import Rollout, accuracy, format_reward
from dsv3.rl.tasks import Problem

PROBLEM = Problem("arithmetic", 1, "What is 8 + 7?", "15", "8+7=15")
GOOD = " <think> 8+7=15 </think> <answer> 15 </answer>"


def sample(text: str, finish: str = "stop", n_tokens: int = 10) -> Completion:
    return Completion(0, 0, [1, 2], tokens=list(range(n_tokens)), finish_reason=finish, text=text)


def test_keeps_complete_correct_well_formed_readable_distinct_samples():
    samples = [sample(GOOD),
               sample(" <think> 8+7=14 </think> <answer> 14 </answer>"),                   # wrong
               sample(" 8+7=15 <answer> 15 </answer>"),                                     # no think block
               sample(GOOD, finish="length"),                                               # cut at the budget
               sample("  <think> 8+7=15 </think>  <answer> 15 </answer>"),                  # GOOD, other spacing
               sample(" <think> a b c a b c a b c a b c </think> <answer> 15 </answer>"),  # repetitive
               sample(" <think> 7+8=15 </think> <answer> 15 </answer>"),
               sample(" <think> fifteen </think> <answer> 15 </answer>")]                  # a third keeper
    counts: dict = {}
    kept = select(PROBLEM, samples, RejectionConfig(max_per_problem=2), counts)
    assert [k.completion for k in kept] == [GOOD, " <think> 7+8=15 </think> <answer> 15 </answer>"]
    assert counts == {"wrong": 1, "format": 1, "truncated": 1, "duplicate": 1, "repetitive": 1,
                      "over_max_per_problem": 1}
    assert all(k.prompt == PROBLEM.question and k.answer == "15" for k in kept)


def test_rules_can_be_relaxed():
    samples = [sample(" <think> 8+7=14 </think> <answer> 14 </answer>"), sample(" 8+7=15 <answer> 15 </answer>")]
    cfg = RejectionConfig(require_correct=False, require_format=False, max_per_problem=5)
    assert len(select(PROBLEM, samples, cfg, {})) == 2


def test_gold_trace_is_the_answer_alone_in_the_template():
    g = gold_trace(PROBLEM)
    r = Rollout(g.completion, PROBLEM, 8, False)
    assert accuracy(r) == 1 and format_reward(r) == 1 and "8+7" not in g.completion
