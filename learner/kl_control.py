"""KL coefficient (beta) controllers for the per-token KL penalty (docs/design.md §3).

Both expose ``.value`` (the beta to use now) and ``.update(current_kl, n_steps)``, called
once per PPO batch with the batch's mean per-sequence KL and its number of episodes.
``state_dict`` / ``load_state_dict`` let an iteration resume with the beta it reached.
Plain classes; only torch-free arithmetic (tests/test_contracts.py).
"""

from __future__ import annotations


class FixedKL:
    """A constant beta (InstructGPT used 0.02)."""

    def __init__(self, beta: float) -> None:
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No change; returns the (constant) beta."""
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["beta"])

    def __repr__(self) -> str:
        return f"FixedKL(beta={self.value:g})"


class AdaptiveKL:
    """Move beta toward a target KL (Ziegler et al. 2019, "Fine-Tuning LMs from Human Prefs").

    ``error = clip(kl / target - 1, -0.2, 0.2)``; ``beta *= 1 + error * n_steps / horizon``.
    The clip bounds how fast beta moves on one noisy batch; ``horizon`` (in episodes) sets
    the time scale: with KL stuck 20%+ off target, beta changes by a factor ~e^0.2 per horizon.
    """

    ERROR_CLIP = 0.2

    def __init__(self, init_beta: float, target: float, horizon: int) -> None:
        if init_beta <= 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                f"init_beta, target and horizon must be > 0, got {init_beta}, {target}, {horizon}")
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Apply one proportional step for ``n_steps`` episodes; returns the new beta."""
        error = min(max(current_kl / self.target - 1.0, -self.ERROR_CLIP), self.ERROR_CLIP)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.value, "target": self.target, "horizon": float(self.horizon)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["beta"])

    def __repr__(self) -> str:
        return f"AdaptiveKL(beta={self.value:g}, target={self.target:g}, horizon={self.horizon})"
