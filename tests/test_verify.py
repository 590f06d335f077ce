"""External rollouts: re-scored locally, forged claims earn nothing, bad input rejected and counted."""

from __future__ import annotations

from dataclasses import dataclass

from swarmnode.protocol import Completion, RolloutBatch, RolloutGroup, TaskRef, codec

from swarmnode.verify import verify_external

PEER = "12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp"
COHORT = "ab" * 32


@dataclass(frozen=True)
class Problem:
    family: str
    seed: int
    index: int
    prompt: str
    answer: str


class AddFamily:
    """a+b with answer a+b; seed -1 is reserved for evaluation (like a real family's held-out seed)."""

    name = "add"

    def problem(self, seed: int, index: int) -> Problem:
        if seed == -1:
            raise ValueError("seed -1 is reserved for evaluation")
        a, b = seed % 50, index % 50
        return Problem("add", seed, index, f"{a}+{b}=", str(a + b))

    def score(self, problem: Problem, text: str) -> float:
        return 1.0 if text.strip() == problem.answer else 0.0

    def is_heldout(self, problem: Problem) -> bool:
        return problem.prompt == "49+49="


def get_family(name: str) -> AddFamily:
    if name != "add":
        raise KeyError(name)
    return AddFamily()


class CharTokenizer:
    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())


def _group(family="add", seed=3, index=4, texts=("7", "8"), reward=1.0, logprobs=True) -> RolloutGroup:
    comps = [
        Completion(
            text=t, token_ids=list(t.encode()), logprobs=[-0.5] * len(t) if logprobs else [], reward=reward
        )
        for t in texts
    ]
    return RolloutGroup(task=TaskRef(family=family, seed=seed, index=index), completions=comps)


def _batch(groups, cohort=COHORT) -> RolloutBatch:
    batch = RolloutBatch(author=PEER, cohort=cohort, policy_step=5, created_at=1.0, groups=list(groups))
    return codec.decode(codec.encode(batch), expected=RolloutBatch)  # exactly what comes off the wire


def _verify(batch, **kw):
    return verify_external(batch, CharTokenizer(), local_fingerprint=COHORT, get_family=get_family, **kw)


def test_forged_reward_claim_is_ignored():
    groups, rejects = _verify(_batch([_group(texts=("7", "8", "99"), reward=1.0)]))
    assert not rejects
    assert groups[0].rewards == [1.0, 0.0, 0.0]  # 3+4=7: only "7" is right, whatever the sender says
    assert groups[0].meta["claimed_rewards"] == [1.0, 1.0, 1.0]
    assert groups[0].source == PEER
    assert groups[0].sender_logprobs == [[-0.5], [-0.5], [-0.5, -0.5]]


def test_bad_refs_wrong_family_oversized_and_group_size_are_rejected_and_counted():
    batch = _batch(
        [
            _group(family="sudoku"),
            _group(seed=-1),  # reserved for evaluation
            _group(index=10**9),
            _group(seed=49, index=49),  # held-out problem
            _group(texts=("7", "x" * 3000)),  # under the wire limit, over ours
            _group(texts=("7",)),
            _group(seed=8, texts=("12", "11", "10")),  # valid
            _group(seed=8, texts=("12", "11", "10")),  # the same problem twice
        ]
    )
    groups, rejects = _verify(batch)
    assert [g.problem.prompt for g in groups] == ["8+4="]
    assert rejects == {
        "unknown_family": 1,
        "bad_task_ref": 2,
        "heldout_problem": 1,
        "oversized_text": 1,
        "wrong_group_size": 1,
        "duplicate_group": 1,
    }


def test_expected_group_size_and_non_finite_values():
    groups, rejects = _verify(_batch([_group(texts=("7", "8", "9"))]), group_size=4)
    assert not groups
    assert rejects["wrong_group_size"] == 1
    # Non-finite floats cannot be constructed through the codec's checks here; a hand-built batch can.
    bad = RolloutBatch(
        author=PEER, cohort=COHORT, policy_step=1, created_at=1.0, groups=[_group(reward=float("nan"))]
    )
    groups, rejects = _verify(bad)
    assert not groups
    assert rejects["non_finite"] == 1


def test_other_cohort_keeps_no_sender_logprobs_and_arrival_step_stamps_groups():
    groups, _ = _verify(_batch([_group()], cohort="cd" * 32), arrival_step=42)
    assert groups[0].sender_logprobs is None
    assert groups[0].policy_step == 42
    assert groups[0].meta["sender_step"] == 5


def test_sender_ids_with_eos_are_trained_on_and_mismatched_ids_are_not():
    eos = CharTokenizer.eos_token_id
    stopped = _group(texts=("7", "8"))
    # what the HF engine sends: the completion's ids end with EOS and carry one logprob per id
    stopped = RolloutGroup(
        task=stopped.task,
        completions=[
            Completion(text=c.text, token_ids=[*c.token_ids, eos], logprobs=[-0.5, -0.1], reward=0.0)
            for c in stopped.completions
        ],
    )
    groups, _ = _verify(_batch([stopped]))
    assert groups[0].completion_ids == [[ord("7"), eos], [ord("8"), eos]]
    assert groups[0].sender_logprobs == [[-0.5, -0.1], [-0.5, -0.1]]
    lying = RolloutGroup(
        task=stopped.task,
        completions=[
            Completion(text="7", token_ids=[ord("9"), eos], logprobs=[-0.5, -0.1], reward=0.0),
            Completion(text="8", token_ids=[ord("8"), eos], logprobs=[-0.5, -0.1], reward=0.0),
        ],
    )
    groups, _ = _verify(_batch([lying]))
    # ids that do not spell the text: our own tokenisation (+EOS) is trained on, the logprobs dropped
    assert groups[0].completion_ids == [[ord("7"), eos], [ord("8"), eos]]
    assert groups[0].sender_logprobs is None
