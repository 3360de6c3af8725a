"""Generated tasks: the addition chain of thought, the erring teacher, held-out splits, countdown
problems that their own reward accepts, and the character tokenizer."""
import random

import pytest

from dsv3_train.posttrain.rewards import accuracy_reward, countdown_reward, format_reward
from dsv3_train.posttrain.tasks import addition_problems, countdown_problems, countdown_teacher, make_problems
from dsv3_train.posttrain.tasks.arithmetic import SystematicTeacher, addition_thought, has_carry_into
from dsv3_train.posttrain.template import format_completion, parse_completion
from dsv3_train.posttrain.tokenizer import CharTokenizer


def test_addition_thought_hand_example():
    thought, answer = addition_thought(347, 285)
    assert thought == "7+5=12>2,4+8+1=13>32,3+2+1=6>632" and answer == "632"
    thought, answer = addition_thought(953, 765)
    assert thought == "3+5=8>8,5+6=11>18,9+7+1=17>1718" and answer == "1718"


def test_addition_thought_is_right_for_random_operands_of_any_width():
    rng = random.Random(0)
    for _ in range(500):
        a, b = rng.randint(0, 99999), rng.randint(0, 999)
        assert int(addition_thought(a, b)[1]) == a + b


def test_dropped_carry_answers_as_if_the_column_had_no_carry():
    thought, answer = addition_thought(953, 765, dropped_carry_column=2)
    assert thought == "3+5=8>8,5+6=11>18,9+7=16>1618" and answer == "1618"


def test_teacher_errs_only_in_its_situation_and_at_its_rate():
    rows = addition_problems("train", 2000, seed=0)
    teacher = SystematicTeacher(drop_column=2, rate=0.75, seed=0)
    completions = [teacher.complete(row) for row in rows]
    correct = accuracy_reward([], completions, answer=[row["answer"] for row in rows])
    assert format_reward([], completions) == [1.0] * len(rows)
    situation = [has_carry_into(row["a"], row["b"], 2) for row in rows]
    assert all(c == 1.0 for c, s in zip(correct, situation) if not s)
    wrong_rate = sum(1 - c for c, s in zip(correct, situation) if s) / sum(situation)
    assert 0.7 < wrong_rate < 0.8
    a, b = rows[0]["a"], rows[0]["b"]
    assert SystematicTeacher(rate=0.0).complete(rows[0]) == format_completion(*addition_thought(a, b))


def test_splits_are_disjoint_and_draws_repeat_by_seed():
    train = {r["prompt"] for r in addition_problems("train", 3000, seed=1)}
    test = {r["prompt"] for r in addition_problems("test", 500, seed=1)}
    assert not train & test
    assert addition_problems("test", 50, seed=3) == addition_problems("test", 50, seed=3)
    assert addition_problems("test", 50, seed=3) != addition_problems("test", 50, seed=4)


def test_asking_for_more_problems_than_exist_names_the_limit():
    with pytest.raises(ValueError, match="at most"):
        addition_problems("test", 10_000, seed=0, digits=2)


def test_countdown_problems_are_solved_by_their_own_solution_and_split():
    rows = countdown_problems("train", 100, seed=0)
    completions = [countdown_teacher(row) for row in rows]
    scores = countdown_reward([], completions, numbers=[r["numbers"] for r in rows], target=[r["target"] for r in rows])
    assert scores == [1.0] * 100
    test = countdown_problems("test", 30, seed=0)
    key = lambda r: (tuple(sorted(r["numbers"])), r["target"])  # noqa: E731
    assert not {key(r) for r in rows} & {key(r) for r in test}


def test_unknown_task_names_the_choices():
    with pytest.raises(ValueError, match="arithmetic"):
        make_problems("sorting", "train", 1, 0)


def test_tokenizer_round_trips_and_keeps_tags_whole():
    tok = CharTokenizer()
    text = format_completion("9+7+1=17>1718", "1718")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) == len("9+7+1=17>1718") + len("1718") + 4
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == text
    assert parse_completion(tok.decode(ids)).well_formed
    with pytest.raises(ValueError, match="alphabet"):
        tok.encode("é")


def test_tokenizer_saves_and_loads(tmp_path):
    tok = CharTokenizer(characters="0123456789+=")
    tok.save(tmp_path / "t.json")
    again = CharTokenizer.load(tmp_path / "t.json")
    assert again.vocab == tok.vocab and again.encode("1+2=") == tok.encode("1+2=")
