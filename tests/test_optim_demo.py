"""DeMo: component round trip, error feedback, sign-step direction, peer averaging, toy regression."""

from __future__ import annotations

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


def test_peers_average_over_selectors_only():
    p = _param(64, seed=2)
    opt = DeMo([("v", p)], lr=0.1, k=64, use_dct=False)  # identity transform: coefficients are values
    p.grad = torch.zeros_like(p)
    opt.compute_components()  # own contribution: all zeros
    before = p.detach().clone()
    # One peer selected only coefficient 3 with a large positive value: the average over *selectors*
    # is (0 + 5) / 2 > 0, so that coordinate steps down; untouched ones (all-zero average) do not move.
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


def test_build_optimizer_rejects_unknown_names():
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer("sgd", [("w", _param(2))])
    assert isinstance(build_optimizer("adamw", [("w", _param(2))]), torch.optim.AdamW)
