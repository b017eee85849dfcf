"""Rule rewards on adversarial outputs: answers outside the tags, several answer tags, unbalanced tags,
huge numbers, expressions that try to execute code; the weighted sum from config."""
import time

import pytest

from dsv3.config.post_training import RewardTerm
from dsv3.rl.expression import ExpressionError, evaluate, reaches_target
from dsv3.rl.rewards import (Rollout, WeightedReward, accuracy, answer_field, format_reward, math_equal, overlong,
                             repetition)
from dsv3.rl.tasks import Problem

ARITH = Problem("arithmetic", 2, "What is 58 + 62?", "120", "")
EQ = Problem("linear_equation", 4, "Solve for x: 2x + 7 = 0", "-7/2", "")
COUNT = Problem("countdown", 1, "Make 7 from the numbers [3, 3, 7] ...", "(3 * 7) / 3", "",
                {"numbers": [3, 3, 7], "target": 7})


def acc(text, problem=ARITH):
    return accuracy(Rollout(text, problem))


def test_the_answer_field_alone_decides():
    assert acc(" <think> 8+2=10 </think> <answer> 120 </answer>") == 1.0
    assert acc("<think>so 120</think><answer>121</answer>") == 0.0
    assert acc("The answer is 120.") == 0.0                                   # outside the tags
    assert acc("<think>120</think> 120") == 0.0
    assert acc("<answer>120</answer><answer>120</answer>") == 0.0             # several answer tags
    assert acc("<answer>121</answer> <answer>120</answer>") == 0.0
    assert acc("<answer>120") == 0.0 and acc("120</answer>") == 0.0           # unbalanced
    assert acc("</answer>120<answer>") == 0.0                                 # reversed
    assert acc("<answer>   </answer>") == 0.0 and acc("<answer></answer>") == 0.0  # empty
    assert acc("") == 0.0
    assert answer_field("<answer> x = 5 </answer>") == "x = 5"


def test_math_answers_in_any_equivalent_form():
    for good in ["-7/2", "-3.5", "x = -7/2", "\\frac{-7}{2}", "$-\\frac{7}{2}$", "x=-3.5"]:
        assert acc(f"<answer>{good}</answer>", EQ) == 1.0, good
    for bad in ["7/2", "-3.4", "x = 3.5", "-7", "\\frac{7}{2}"]:
        assert acc(f"<answer>{bad}</answer>", EQ) == 0.0, bad
    assert math_equal("120.0", "120") and math_equal("x = 120", "120")


@pytest.mark.parametrize("huge", ["9" * 5000, "1" + "0" * 200, "9**9**9**9", "9^{9^{9^{9}}}", "10^{10^{10}}",
                                  "1e100000", "(" * 5000 + "1" + ")" * 5000])
def test_huge_numbers_are_wrong_quickly(huge):
    start = time.perf_counter()
    assert acc(f"<answer>{huge}</answer>") == 0.0
    assert acc(f"<answer>{huge}</answer>", COUNT) == 0.0
    assert time.perf_counter() - start < 3.0  # bounded by length checks and math-verify's 1 s timeout


@pytest.mark.parametrize("attack", [
    "__import__('os').system('touch /tmp/pwned_by_reward')", "open('/etc/passwd').read()",
    "(lambda: 7)()", "3*7/3 if True else 0", "exec('x=7')", "7; import os", "3 * 7 / 3 # and more",
    "0x7", "7.0", "3**1 * 7 / 3",
])
def test_expressions_that_try_to_execute_code_score_zero(attack, tmp_path):
    assert acc(f"<answer>{attack}</answer>", COUNT) == 0.0
    assert acc(f"<answer>{attack}</answer>", ARITH) == 0.0
    with pytest.raises(ExpressionError):
        evaluate(attack)
    import os
    assert not os.path.exists("/tmp/pwned_by_reward")


def test_countdown_checker():
    for good in ["(3 * 7) / 3", "3*7/3", "7 * 3 / 3 = 7", "7 / 3 * 3", "(7 - 3) + 3", "- 3 + 3 + 7"]:
        assert acc(f"<answer>{good}</answer>", COUNT) == 1.0, good
    for bad in ["7", "3 + 3 + 7", "7 * 3 / 3 = 8", "3 * 7 / 3 = 21 / 3", "(3 * 7 / 3", "3 * 7 / (3 - 3)",
                "7 + 3 - 3 + 3 - 3", "3 * 7 / 3 = 7 = 7"]:
        assert acc(f"<answer>{bad}</answer>", COUNT) == 0.0, bad
    assert not reaches_target("1" * 7, [1111111], 1111111)  # more digits than any task uses
    assert evaluate("((2))*-3").value == -6


def test_format_reward():
    ok = " <think> step </think> <answer> 120 </answer>"
    assert format_reward(Rollout(ok, ARITH)) == 1.0
    for bad in ["<answer>120</answer>", "<think>a</think>", "<answer>1</answer><think>a</think>",
                "<think>a</think><answer>1</answer> and more", "<think>a<think>b</think><answer>1</answer>",
                "<think>a</think><answer> </answer>", "<think>a</think><answer>1</answer><answer>1</answer>",
                "<think>a</think><answer>1"]:
        assert format_reward(Rollout(bad, ARITH)) == 0.0, bad


def test_overlong_and_repetition():
    def ov(n, truncated=False):
        return overlong(Rollout("", ARITH, n_tokens=n, truncated=truncated), max_tokens=100, buffer_tokens=20)
    assert ov(80) == 0.0 and ov(90) == pytest.approx(-0.5) and ov(100) == pytest.approx(-1.0)
    assert ov(101) == -1.0 and ov(10, truncated=True) == -1.0
    assert repetition(Rollout("a b c d e f g h", ARITH)) == 0.0
    assert repetition(Rollout("go on " * 50, ARITH)) < -0.9
    assert repetition(Rollout("one two", ARITH)) == 0.0


def test_weighted_sum_from_config():
    reward = WeightedReward([RewardTerm("accuracy", 1.0), RewardTerm("format", 0.5),
                             RewardTerm("overlong", 0.25, {"max_tokens": 10, "buffer_tokens": 5})])
    rollouts = [Rollout("<think>x</think><answer>120</answer>", ARITH, n_tokens=4),
                Rollout("<answer>120</answer>", ARITH, n_tokens=9),
                Rollout("120", ARITH, n_tokens=12, truncated=True)]
    totals, parts = reward(rollouts)
    assert parts == {"accuracy": [1.0, 1.0, 0.0], "format": [1.0, 0.0, 0.0], "overlong": [0.0, -0.8, -1.0]}
    assert totals == pytest.approx([1.5, 0.8, -0.25])


@pytest.mark.parametrize("terms,match", [
    ([RewardTerm("speed")], "rewards\\[0\\].name='speed'"),
    ([RewardTerm("overlong", params={"max_tokens": 10})], "buffer_tokens"),
    ([RewardTerm("accuracy", params={"strict": True})], "unknown \\['strict'\\]"),
    ([RewardTerm("format"), RewardTerm("format")], "twice"),
    ([], "at least one"),
])
def test_bad_reward_config_is_named(terms, match):
    with pytest.raises(ValueError, match=match):
        WeightedReward(terms)


def test_pass_at_k_estimator():
    from dsv3.rl.evaluate import pass_at_k

    assert pass_at_k(8, 0, 1) == 0.0 and pass_at_k(8, 8, 4) == 1.0
    assert pass_at_k(8, 2, 1) == pytest.approx(2 / 8)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # C(3,2)/C(4,2) pairs miss the correct one


def test_evaluate_scores_each_sample_by_its_answer_field():
    from dsv3.generate import Completion, GenerationResult, SamplingParams
    from dsv3.rl.evaluate import evaluate

    replies = {0: ["<think>a</think><answer>120</answer>", "<answer>121</answer>"],
               1: ["<think>b</think><answer>x = -3.5</answer>", "<think>c</think><answer>-7/2</answer>"]}

    class Scripted:  # a generator that answers from a script, so the test checks the scoring alone
        def generate(self, prompts, params, prompt_ids):
            out = [Completion(i, g, [], text=replies[pid][g], tokens=[1] * (g + 2), finish_reason="stop")
                   for i, pid in enumerate(prompt_ids) for g in range(params.num_samples)]
            return GenerationResult(out, {"completion_tokens": 0, "seconds": 1.0})

    res = evaluate(Scripted(), [ARITH, EQ], SamplingParams(num_samples=2), ks=(1, 2))
    assert res["pass@1"] == pytest.approx((0.5 + 1.0) / 2) and res["pass@2"] == 1.0
    assert res["format"] == pytest.approx(3 / 4) and res["mean_length"] == 2.5
    assert res["pass@1/arithmetic"] == 0.5 and res["pass@1/linear_equation"] == 1.0
