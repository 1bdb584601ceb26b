"""Pure logits -> token functions (rank 0 only). No MPI, no torch: NumPy and a seeded Generator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0   # 0 = greedy
    top_k: int = 0             # 0 = off
    top_p: float = 1.0         # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ConfigError(f"--temperature {self.temperature}: must be 0 (greedy) or positive")
        if self.top_k < 0:
            raise ConfigError(f"--top-k {self.top_k}: must be 0 (off) or positive")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p {self.top_p}: must be in (0, 1]")


# what the command line samples with, and what serve applies to a request that sets no sampling
# field (as llama-server applies its own defaults rather than OpenAI's temperature 1, top_p 1)
SamplingConfig.DEFAULT = SamplingConfig(temperature=0.8, top_k=40, top_p=0.95)


def sample(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    """One token id from full-vocabulary float32 logits."""
    if cfg.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / cfg.temperature
    if 0 < cfg.top_k < z.size:
        kth = np.partition(z, -cfg.top_k)[-cfg.top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if cfg.top_p < 1:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, cfg.top_p)) + 1]   # smallest set reaching top_p
        kept = np.zeros_like(p)
        kept[keep] = p[keep]
        p = kept / kept.sum()
    return int(rng.choice(p.size, p=p))       # one draw: sample_draws relies on it


def sample_draws(rng: np.random.Generator, cfg: SamplingConfig, n: int) -> None:
    """Move `rng` on as `n` calls of `sample` would: a resumed request samples as if never stopped."""
    if cfg.temperature > 0:
        rng.random(n)
