"""Rewards and the things they read: the template parser (missing tags, extra text, malformed
numbers), accuracy / format / countdown scores, weighted sums with skipped samples, and the
process pool's deadline (a hung reward scores None and training goes on)."""
import time

import pytest

from dsv3_train.posttrain.rewards import (RewardPool, RewardSpec, accuracy_reward, countdown_reward, format_reward,
                                          weighted_sum)
from dsv3_train.posttrain.template import format_completion, parse_completion, parse_integer

GOOD = "<think>7+5=12>2</think><answer>12</answer>"


# ----------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, well_formed, answer", [
    (GOOD, True, "12"),
    ("  " + GOOD + "\n", True, "12"),                                   # surrounding whitespace is fine
    ("<think>x</think><answer> 12 </answer>", True, "12"),              # answer stripped
    ("<answer>12</answer>", False, "12"),                               # no think block
    ("<think>x</think>12", False, None),                                # no answer tags
    ("<think>x</think><answer>12", False, None),                        # unclosed answer
    ("<think>x<answer>12</answer>", False, "12"),                       # unclosed think
    (GOOD + " so 12", False, "12"),                                     # extra text after
    ("Sure! " + GOOD, False, "12"),                                     # extra text before
    ("<think>x</think> <answer>12</answer>", False, "12"),              # text between the blocks
    ("<think>x</think><answer>12</answer><answer>13</answer>", False, "12"),  # the first answer counts
    ("<think><think>x</think><answer>12</answer>", False, "12"),        # a tag inside the thought
    ("", False, None),
])
def test_parse_completion_edge_cases(text, well_formed, answer):
    parsed = parse_completion(text)
    assert (parsed.well_formed, parsed.answer) == (well_formed, answer)


@pytest.mark.parametrize("answer, value", [
    ("632", 632), ("-5", -5), ("+7", 7), ("007", 7),
    ("6 32", None), ("1,000", None), ("6.0", None), ("632abc", None), ("", None), ("--5", None), (None, None),
])
def test_parse_integer_accepts_only_a_signed_run_of_digits(answer, value):
    assert parse_integer(answer) == value


def test_format_completion_round_trips():
    parsed = parse_completion(format_completion("a+b", "3"))
    assert parsed.well_formed and parsed.thought == "a+b" and parsed.answer == "3"


# ----------------------------------------------------------------------------- rewards
def test_accuracy_reads_the_answer_tags_and_skips_rows_without_truth():
    completions = [GOOD, "<think>x</think><answer>13</answer>", "12", GOOD + " extra",
                   "<answer>1,2</answer>", GOOD]
    scores = accuracy_reward([""] * 6, completions, answer=["12", "12", "12", "12", "12", None])
    assert scores == [1.0, 0.0, 0.0, 1.0, 0.0, None]  # extra text outside the tags does not matter


def test_format_rewards_only_the_exact_template():
    assert format_reward(["", ""], [GOOD, GOOD + "!"]) == [1.0, 0.0]


@pytest.mark.parametrize("answer, score", [
    ("(17-9)+2", 1.0), ("2+17-9", 1.0), ("(10+17)/9*1", 0.0),  # the last uses a number not given
    ("17-9", 0.0),                  # not every number used
    ("17-9+2+2", 0.0),              # a number used twice
    ("17-(9-2)", 1.0),              # another solution: 17 - 7
    ("17+9-2", 0.0),                # valid use, wrong value
    ("17**1-9+2", 0.0), ("abs(17)-9+2", 0.0), ("17-9+2.0", 0.0),  # operators/names/floats not allowed
    ("17/(9-9)+2", 0.0), ("", 0.0), ("17-9+", 0.0),
])
def test_countdown_checks_numbers_operators_and_value(answer, score):
    completion = format_completion("", answer)
    assert countdown_reward([""], [completion], numbers=[[9, 2, 17]], target=[10]) == [score]


def test_countdown_division_is_exact():
    completion = format_completion("", "7/2*4")  # 14 exactly, not 12 (integer division) or 14.000001
    assert countdown_reward([""], [completion], numbers=[[7, 2, 4]], target=[14]) == [1.0]


def test_weighted_sum_skips_none_and_is_none_when_nothing_scored():
    total = weighted_sum({"a": [1.0, None, None], "b": [1.0, 1.0, None]}, {"a": 1.0, "b": 0.5})
    assert total == [1.5, 0.5, None]


# ----------------------------------------------------------------------------- the pool
def hanging_reward(prompts, completions, **_):
    time.sleep(60)
    return [1.0] * len(completions)


def failing_reward(prompts, completions, **_):
    raise RuntimeError("broken on purpose")


def short_reward(prompts, completions, **_):
    return [1.0]


def length_reward(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def test_pool_in_process_scores_and_weights():
    with RewardPool([RewardSpec("accuracy", 1.0), RewardSpec("format", 0.5)], workers=0) as pool:
        scores = pool(["p", "p"], [GOOD, "12"], {"answer": ["12", "12"]})
    assert scores.total == [1.5, 0.0]
    assert scores.by_name == {"accuracy": [1.0, 0.0], "format": [1.0, 0.0]}


@pytest.mark.filterwarnings("ignore:reward .* scored None")
def test_a_hung_or_broken_reward_scores_none_and_the_pool_keeps_working():
    specs = [RewardSpec(f"{__name__}:hanging_reward"), RewardSpec(f"{__name__}:failing_reward"),
             RewardSpec(f"{__name__}:short_reward"), RewardSpec(f"{__name__}:length_reward", 2.0)]
    pool = RewardPool(specs, workers=2, timeout_s=3.0)
    try:
        start = time.monotonic()
        scores = pool(["p", "p"], ["ab", "abc"], {})
        assert time.monotonic() - start < 20
        assert scores.failed[f"{__name__}:hanging_reward"] == "timeout"
        assert "broken on purpose" in scores.failed[f"{__name__}:failing_reward"]
        assert "1 scores for 2" in scores.failed[f"{__name__}:short_reward"]
        assert scores.total == [4.0, 6.0]  # only the working reward counts
        again = pool(["p"], ["abcd"], {})  # the restarted pool still scores
        assert again.by_name[f"{__name__}:length_reward"] == [4.0]
    finally:
        pool.close()


def test_unknown_reward_fails_at_construction():
    with pytest.raises(ValueError, match="neither registered"):
        RewardPool([RewardSpec("accurracy")])
