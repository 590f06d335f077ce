"""DeMo: component round trip, error feedback, sign-step direction, peer averaging, toy regression."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("swarmnode.compression.dct")

from swarmnode.compression.dct import ChunkedDCT, scatter_chunks

from swarmnode.optim import build_optimizer
from swarmnode.optim.demo import DeMo


def _param(*shape: int, seed: int = 0) -> torch.nn.Parameter:
    torch.manual_seed(seed)
    return torch.nn.Parameter(torch.randn(*shape))


@pytest.mark.parametrize("shape", [(64, 128), (70, 130)])  # the second one has padded chunks
def test_components_round_trip_and_error_feedback_keeps_unsent_mass(shape):
    p = _param(*shape)
    opt = DeMo([("w", p)], lr=1e-2, beta=0.9, k=32)
    p.grad = torch.randn_like(p)
    expected_delta = 1e-2 * p.grad.clone()  # beta * 0 + lr * g
    comps = opt.compute_components()
    idx, vals = comps["w"]
    t = ChunkedDCT(shape, chunk=64)
    sent = t.inverse(scatter_chunks(idx, vals, t.n_chunks, t.chunk_numel)).reshape(p.shape)
    residual = opt.state[p]["delta"]
    # What was sent plus what was kept is exactly the momentum: nothing is lost.
    torch.testing.assert_close(sent + residual, expected_delta, atol=1e-6, rtol=1e-5)
    assert 0 < opt.last_energy_ratio < 1
    # The residual has no energy left on the sent coefficients (exact only without padding: cropping
    # the padded inverse is not orthonormal, but the sum above still holds exactly).
    if shape == (64, 128):
        assert torch.gather(t.forward(residual), 1, idx).abs().max() < 1e-6


def test_sign_step_moves_against_the_gradient():
    p = _param(8, seed=1)
    before = p.detach().clone()
    opt = DeMo([("b", p)], lr=0.01, k=64)  # k >= chunk: everything is sent, so Q is the full momentum
    p.grad = torch.ones_like(p)
    opt.step()
    torch.testing.assert_close(p.detach(), before - 0.01)


def test_a_peer_votes_only_where_it_sent_components():
    p = _param(64, seed=2)
    opt = DeMo([("v", p)], lr=0.1, k=64, use_dct=False)  # identity transform: coefficients are values
    p.grad = torch.zeros_like(p)
    opt.compute_components()  # own contribution: all zeros
    before = p.detach().clone()
    # One peer selected only coefficient 3 with a positive value: ours is 0 everywhere (no vote), so
    # its vote decides coordinate 3, which steps down; the others get no vote and do not move.
    peer = {"v": (torch.tensor([[3]]), torch.tensor([[5.0]]))}
    opt.apply_components([peer])
    diff = p.detach() - before
    assert diff[3] == pytest.approx(-0.1)
    assert diff.abs().sum() == pytest.approx(0.1)


def test_demo_reduces_loss_on_a_toy_regression():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    x = torch.randn(256, 16)
    y = x[:, :4].sum(1, keepdim=True)
    opt = build_optimizer("demo", model.named_parameters(), type("C", (), {"lr": 3e-3})())
    losses = []
    for _ in range(150):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]


def test_two_replicas_voting_with_each_other_still_reduce_the_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = x[:, :4].sum(1, keepdim=True)
    models = [
        torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        for _ in range(2)
    ]
    opts = [DeMo(m.named_parameters(), lr=3e-3) for m in models]
    first = last = 0.0
    for _ in range(150):
        comps = []
        for i, (m, opt) in enumerate(zip(models, opts, strict=True)):
            half = slice(i * 128, (i + 1) * 128)  # each replica sees its own half of the data
            loss = ((m(x[half]) - y[half]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            comps.append(opt.compute_components())
            first = first or float(loss.detach())
            last = float(loss.detach())
        for i, opt in enumerate(opts):
            opt.apply_components([comps[1 - i]])
    assert last < 0.3 * first


def test_build_optimizer_rejects_unknown_names():
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer("sgd", [("w", _param(2))])
    assert isinstance(build_optimizer("adamw", [("w", _param(2))]), torch.optim.AdamW)


# -- hostile peers: one vote each ----------------------------------------------------------------


def _dc_push(opt: DeMo, name: str, value: float) -> dict:
    """A peer's components that select only the DC coefficient of every chunk, with ``value``."""
    t = opt.transforms[name]
    idx = torch.zeros(t.n_chunks, 1, dtype=torch.int64)
    return {name: (idx, torch.full((t.n_chunks, 1), value))}


def _honest_demo(seed: int = 5) -> tuple[torch.nn.Parameter, DeMo, dict]:
    p = _param(64, 64, seed=seed)
    opt = DeMo([("w", p)], lr=0.01, k=32)
    torch.manual_seed(seed + 1)
    p.grad = torch.randn_like(p)
    own = opt.compute_components()
    return p, opt, own


def _moves(p: torch.nn.Parameter, opt: DeMo, peers: list) -> torch.Tensor:
    before = p.detach().clone()
    opt.apply_components(peers)
    return p.detach() - before


def test_a_peer_pushing_one_dc_coefficient_40_times_moves_nothing_against_agreeing_peers() -> None:
    p, opt, own = _honest_demo()
    alone = _alone(opt, own)
    # two honest peers that agree with us, and one attacker pushing DC +1e30 in 40 messages a step
    attacker = [_dc_push(opt, "w", 1e30) for _ in range(40)]
    moved = _moves(p, opt, [own, own, attacker])
    assert bool(torch.isfinite(p).all())
    assert opt.last_voters == 3
    # the attacker's DC push says "step down" everywhere; it moved no element that way
    assert int((moved != alone).sum()) == 0


def test_alone_against_one_attacker_a_tie_keeps_our_own_sign() -> None:
    p, opt, own = _honest_demo(seed=7)
    alone = _alone(opt, own)
    moved = _moves(p, opt, [[_dc_push(opt, "w", -1e6)] * 40])
    assert torch.equal(moved, alone)


def test_as_a_flat_list_each_repeat_would_count_as_a_voter() -> None:
    """Why peers must be passed grouped: 40 loose dicts are 40 votes."""
    p, opt, own = _honest_demo(seed=8)
    alone = _alone(opt, own)
    moved = _moves(p, opt, [own, own, *[_dc_push(opt, "w", 1e30) for _ in range(40)]])
    assert float((moved != alone).float().mean()) > 0.3


def test_one_peer_flips_an_element_only_where_the_honest_vote_is_within_its_share() -> None:
    """Five honest contributors with independent gradients and one attacker: an element moves the
    attacker's way only where the honest votes were within 2 of a tie (one vote out of six)."""
    p, opt, own = _honest_demo(seed=9)
    honest_peers = []
    t = opt.transforms["w"]
    for s in range(4):
        torch.manual_seed(100 + s)
        q = 0.01 * torch.randn(t.n_chunks, t.chunk_numel)  # our own order of magnitude
        idx = torch.topk(q.abs(), 32, dim=1).indices.sort(dim=1).values
        vals = torch.gather(q, 1, idx)
        honest_peers.append({"w": (idx, vals)})
    honest_votes = torch.sign(t.inverse(_dense(own["w"], t)).reshape(p.shape))
    for h in honest_peers:
        honest_votes += torch.sign(t.inverse(_dense(h["w"], t)).reshape(p.shape))
    moved = _moves(p, opt, [*honest_peers, [_dc_push(opt, "w", 1e30)] * 40])
    # DC +1e30 gives a positive Q everywhere: the attacker votes for p <- p - lr (moved < 0)
    against_honest = (moved < 0) & (honest_votes < 0)
    assert bool((honest_votes[against_honest] == -1).all())
    decided = honest_votes.abs() >= 3  # the attacker's one vote cannot overturn these
    assert torch.equal(torch.sign(moved[decided]), -torch.sign(honest_votes[decided]))
    assert opt.last_voters == 5


def test_malformed_and_non_finite_peer_entries_are_skipped_and_counted() -> None:
    p, opt, own = _honest_demo(seed=10)
    alone = _alone(opt, own)
    t = opt.transforms["w"]
    nan = {"w": (torch.zeros(t.n_chunks, 1, dtype=torch.int64), torch.full((t.n_chunks, 1), float("nan")))}
    out_of_range = {"w": (torch.full((t.n_chunks, 1), 10**6), torch.ones(t.n_chunks, 1))}
    wrong_rows = {"w": (torch.zeros(3, 1, dtype=torch.int64), torch.ones(3, 1))}
    moved = _moves(p, opt, [nan, out_of_range, wrong_rows, {"other": own["w"]}])
    assert torch.equal(moved, alone)
    assert opt.peer_tensors_skipped == 3
    assert opt.last_voters == 0


def _dense(entry: tuple, t: ChunkedDCT) -> torch.Tensor:
    return scatter_chunks(entry[0], entry[1], t.n_chunks, t.chunk_numel)


def _alone(opt: DeMo, own: dict) -> torch.Tensor:
    """How a twin holding the same weights and own components moves with no peers."""
    q = torch.nn.Parameter(opt._by_name["w"].detach().clone())
    twin = DeMo([("w", q)], lr=opt.param_groups[0]["lr"], k=opt.k)
    twin._own = own
    return _moves(q, twin, [])


def test_large_tensors_are_transformed_band_by_band_with_the_same_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import swarmnode.optim.demo as demo_mod

    def run(band: int) -> tuple[Any, Any]:
        monkeypatch.setattr(demo_mod, "BAND_NUMEL", band)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(96, 200), torch.nn.Linear(200, 7))  # 200 rows: padded
        opt = demo_mod.DeMo(model.named_parameters(), lr=1e-2, k=4, chunk=64)
        peer_model = torch.nn.Sequential(torch.nn.Linear(96, 200), torch.nn.Linear(200, 7))
        peer = demo_mod.DeMo(peer_model.named_parameters(), lr=1e-2, k=4, chunk=64)
        out = []
        for _ in range(3):
            model(torch.randn(5, 96)).pow(2).sum().backward()
            peer_model(torch.randn(5, 96)).pow(2).sum().backward()
            out.append(opt.compute_components())
            theirs = peer.compute_components()
            # the peer's tensors split into two chunk ranges that straddle our bands
            parts: list[dict[str, Any]] = [{}, {}]
            for name, (idx, vals) in theirs.items():
                h = max(1, idx.shape[0] // 3)
                parts[0][name] = (idx[:h], vals[:h], 0)
                if h < idx.shape[0]:
                    parts[1][name] = (idx[h:], vals[h:], h)
            opt.apply_components([parts])
            peer.apply_components([])
            opt.zero_grad()
            peer.zero_grad()
        return out, [p.detach().clone() for p in model.parameters()]

    whole, w_whole = run(1 << 30)
    banded, w_banded = run(64 * 64)  # one tile row per band
    for a, b in zip(whole, banded, strict=True):
        for name in a:
            assert torch.equal(a[name][0], b[name][0])
            assert torch.allclose(a[name][1], b[name][1], rtol=1e-5, atol=1e-7)
    for x, y in zip(w_whole, w_banded, strict=True):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-7)
