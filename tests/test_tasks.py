from __future__ import annotations

import pytest

from swarmnode.tasks import families, get_family, heldout_problems, is_heldout_prompt

BUILTIN = ["add", "count", "reverse"]


def test_registry_lists_builtins_and_rejects_unknown():
    assert set(BUILTIN) <= set(families())
    with pytest.raises(KeyError, match="unknown task family"):
        get_family("nope")


@pytest.mark.parametrize("name", BUILTIN)
def test_problems_are_deterministic_and_vary(name):
    fam = get_family(name)
    a = [fam.problem(7, i) for i in range(50)]
    b = [fam.problem(7, i) for i in range(50)]
    assert a == b
    assert len({p.prompt for p in a}) > 30
    assert fam.problem(8, 0) != fam.problem(7, 0) or fam.problem(8, 1) != fam.problem(7, 1)
    for p in a:
        assert (p.family, p.seed) == (name, 7)
        assert fam.score(p, p.answer) == 1.0
        assert fam.is_correct(p, f" {p.answer}\n")


@pytest.mark.parametrize("name", BUILTIN)
def test_heldout_is_fixed_and_disjoint_from_training(name):
    fam = get_family(name)
    held = heldout_problems(name, 200)
    assert held == heldout_problems(name, 200)
    assert len({p.prompt for p in held}) == 200
    assert all(fam.is_heldout(p) for p in held)
    prompts = {p.prompt for p in held}
    for seed in range(5):
        for i in range(1000):
            p = fam.problem(seed, i)
            assert p.prompt not in prompts
            assert not is_heldout_prompt(name, p.prompt)


def test_add_format_and_partial_credit():
    fam = get_family("add")
    p = next(fam.problem(0, i) for i in range(100) if len(fam.problem(0, i).answer) == 3)
    wrong_digit = p.answer[:-1] + str((int(p.answer[-1]) + 1) % 10)
    assert 0.1 < fam.score(p, wrong_digit) < 1.0
    assert fam.score(p, "7") >= 0.1
    assert fam.score(p, wrong_digit) > fam.score(p, "9" * 8)
    assert not fam.is_correct(p, wrong_digit)


@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize(
    "text",
    ["", "   ", "hello world!", "١٢٣", "𝟙𝟚𝟛", "\x00\ud800", "-5", "9" * 100_000, "a" * 1_000_000, "<eos>"],
)
def test_scoring_never_raises_and_stays_in_range(name, text):
    fam = get_family(name)
    p = fam.problem(1, 2)
    s = fam.score(p, text)
    assert 0.0 <= s < 1.0
    assert not fam.is_correct(p, text)


@pytest.mark.parametrize("name", BUILTIN)
def test_garbage_scores_zero(name):
    fam = get_family(name)
    p = fam.problem(3, 4)
    assert fam.score(p, "%%%") == 0.0
    assert fam.score(p, "١٢٣") == 0.0


def test_reverse_and_count_partial_credit():
    rev = get_family("reverse")
    p = rev.problem(0, 0)
    assert 0.0 < rev.score(p, p.answer[:-1] + ("z" if p.answer[-1] != "z" else "y")) < 1.0
    cnt = get_family("count")
    q = cnt.problem(0, 0)
    near = str(int(q.answer) + 1)
    far = str(int(q.answer) + 7)
    assert 0.0 < cnt.score(q, far) < cnt.score(q, near) < 1.0


@pytest.mark.parametrize("name", BUILTIN)
def test_exact_variant_asks_the_same_questions_with_a_binary_reward(name):
    base, exact = get_family(name), get_family(f"{name}-exact")
    assert exact.problem_space == base.problem_space == name
    for i in range(30):
        b, e = base.problem(3, i), exact.problem(3, i)
        assert (e.family, e.prompt, e.answer) == (f"{name}-exact", b.prompt, b.answer)
        longer = b.answer + ("1" if b.answer.isdigit() else "a")  # right alphabet, one extra character
        assert base.score(b, longer) > 0.0
        assert (exact.score(e, e.answer), exact.score(e, longer)) == (1.0, 0.0)
    # same held-out split: a question held out of one is held out of both, and training never sees it
    held = [p.prompt for p in heldout_problems(f"{name}-exact", 50)]
    assert held == [p.prompt for p in heldout_problems(name, 50)]
    assert all(exact.is_heldout(p) for p in heldout_problems(f"{name}-exact", 50))
    assert not set(held) & {exact.problem(0, i).prompt for i in range(2000)}


def test_exact_reverse_gives_no_partial_credit():
    base, exact = get_family("reverse"), get_family("reverse-exact")
    p = exact.problem(1, 0)
    wrong = p.answer[:-1] + ("a" if p.answer[-1] != "a" else "b")
    assert 0.0 < base.score(base.problem(1, 0), wrong) < 1.0
    assert exact.score(p, wrong) == 0.0
    assert exact.score(p, f" {p.answer}\n") == 1.0


def test_problem_rejects_bad_index():
    with pytest.raises(ValueError, match="index"):
        get_family("add").problem(0, -1)


def test_reasoning_gym_missing_extra_is_a_clear_error():
    try:
        import reasoning_gym  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("reasoning-gym is installed here")
    with pytest.raises(ImportError, match=r"pip install 'swarmnode\[tasks\]'"):
        get_family("rg:basic_arithmetic")
