"""What the training loop does with a non-finite loss or gradient: stop (the default; the last
good checkpoint is kept) or skip the step and count it."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..core.errors import TrainingError

__all__ = ["NonFiniteGuard", "ADVICE"]

ADVICE = " Lower --lr, or pass --on-nonfinite skip to skip such steps."


class NonFiniteGuard:
    """Checks losses, gradients and parameters for NaN/inf.

    :param policy: ``stop`` (raise :class:`TrainingError`) or ``skip`` (skip the step).
    :param kept: says what the run folder still holds, for the error message.
    """

    def __init__(self, policy: str, params: Sequence[torch.Tensor], kept: Callable[[], str], log: Callable[[str], None]):
        self.policy, self.params, self.kept, self.log = policy, list(params), kept, log

    def fail(self, what: str) -> TrainingError:
        return TrainingError(f"{what}; training stopped. {self.kept()}{ADVICE}")

    def check_params(self, where: str) -> None:
        """:class:`TrainingError` if any parameter is NaN or infinite (checked before every save)."""
        if not all(bool(torch.isfinite(p).all()) for p in self.params):
            raise self.fail(f"parameters became non-finite {where}")

    def grads_finite(self) -> bool:
        """Whether every gradient is finite (one reduction; used only with ``skip``)."""
        norms = [(p.grad._values() if p.grad.is_sparse else p.grad).norm() for p in self.params if p.grad is not None]
        return bool(torch.isfinite(torch.stack(norms).sum())) if norms else True

    def accept(self, loss: torch.Tensor, where: str) -> bool:
        """Whether to take the step (the loop's one sync per step). A non-finite loss, or with
        ``skip`` non-finite gradients, raises with ``stop`` and returns ``False`` with ``skip``."""
        finite = bool(torch.isfinite(loss))
        if finite and (self.policy == "stop" or self.grads_finite()):
            return True
        what = f"non-finite loss ({loss.item()})" if not finite else "non-finite gradients"
        if self.policy == "stop":
            raise self.fail(f"{what} in {where}")
        self.log(f"{what} in {where}: step skipped")
        return False
