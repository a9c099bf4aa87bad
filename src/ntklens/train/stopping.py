"""When a run stops: a step cap and, optionally, a rule on the training loss.

A run without a rule trains for its ``steps`` (or ``epochs``). With a rule, the loss on the
whole training subset is checked every ``check_every`` steps (step 0 included) and the run
stops at the first check where

* ``train_loss``: the loss is below this tolerance, or
* ``plateau_steps``: the best loss so far has fallen by at most ``plateau_tolerance``
  (relative) from the best loss of the checks at least ``plateau_steps`` steps earlier;

else at the cap. The run's last probe and the kernel baselines happen at the stopping step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ntklens.schema import RunSpec


@dataclass
class StoppingRule:
    """The stopping rule of a run; :meth:`check` is fed the train loss at check steps."""

    train_loss: float | None = None
    plateau_steps: int | None = None
    plateau_tolerance: float = 1e-3
    check_every: int = 10
    _checks: list[tuple[int, float]] = field(default_factory=list, repr=False)

    @classmethod
    def from_spec(cls, spec: RunSpec) -> StoppingRule | None:
        """The spec's rule, or None if it sets neither a loss tolerance nor a plateau."""
        if spec.stop_train_loss is None and spec.stop_plateau_steps is None:
            return None
        return cls(
            train_loss=spec.stop_train_loss,
            plateau_steps=spec.stop_plateau_steps,
            plateau_tolerance=spec.stop_plateau_tolerance,
            check_every=spec.stop_check_every,
        )

    def check(self, step: int, loss: float) -> bool:
        """Record the train loss at ``step``; True if the rule is met there."""
        if not math.isfinite(loss):
            return False
        self._checks.append((step, loss))
        if self.train_loss is not None and loss < self.train_loss:
            return True
        if self.plateau_steps is None or step < self.plateau_steps:
            return False
        best_now = min(value for _, value in self._checks)
        best_then = min(value for at, value in self._checks if at <= step - self.plateau_steps)
        return best_then - best_now <= self.plateau_tolerance * abs(best_then)
