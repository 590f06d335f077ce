"""Error feedback: what a lossy step did not send is kept and added to the next step's input."""

from __future__ import annotations

import torch
from torch import Tensor


class ErrorFeedback:
    """A residual per name. add() accumulates, take() reads, subtract_sent() removes what went out.

    Typical use: add(name, update); full = take(name); send compress(full); subtract_sent(name,
    decompress(sent)). The residual then holds exactly what was not sent.
    """

    __slots__ = ("_residual",)

    def __init__(self) -> None:
        self._residual: dict[str, Tensor] = {}

    def add(self, name: str, tensor: Tensor) -> None:
        r = self._residual.get(name)
        if r is None:
            self._residual[name] = tensor.detach().to(torch.float32).clone()
        else:
            if r.shape != tensor.shape:
                raise ValueError(
                    f"{name}: shape {tuple(tensor.shape)} differs from residual {tuple(r.shape)}"
                )
            r.add_(tensor.detach().to(torch.float32))

    def take(self, name: str) -> Tensor:
        """The current residual (a live view; clone before modifying). KeyError if never added."""
        return self._residual[name]

    def subtract_sent(self, name: str, sent_dense: Tensor) -> None:
        r = self._residual[name]
        if r.shape != sent_dense.shape:
            raise ValueError(
                f"{name}: sent shape {tuple(sent_dense.shape)} differs from residual {tuple(r.shape)}"
            )
        r.sub_(sent_dense.detach().to(torch.float32))

    def names(self) -> list[str]:
        return list(self._residual)

    def norm(self, name: str) -> float:
        return float(self._residual[name].norm())
