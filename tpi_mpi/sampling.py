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
    """One token id from full-vocabulary float32 logits: temperature, then the top_k best (by id),
    then of those the smallest set, most likely first, whose probability reaches top_p. Only the k
    kept are sorted, not the vocabulary."""
    if cfg.temperature == 0:
        return int(np.argmax(logits))
    ids, p = distribution(logits, cfg)
    return int(ids[rng.choice(p.size, p=p)])       # one draw: sample_draws relies on it


def distribution(logits: np.ndarray, cfg: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
    """The tokens `sample` may draw (temperature > 0) and their probabilities."""
    z = logits.astype(np.float64) / cfg.temperature
    ids = np.sort(np.argpartition(z, -cfg.top_k)[-cfg.top_k:]) if 0 < cfg.top_k < z.size else np.arange(z.size)
    if cfg.top_p < 1:
        ids = ids[np.argsort(-z[ids], kind="stable")]
    p = np.exp(z[ids] - z[ids].max())
    p /= p.sum()
    if cfg.top_p < 1:
        n = int(np.searchsorted(np.cumsum(p), cfg.top_p)) + 1
        ids, p = ids[:n], p[:n] / p[:n].sum()
    return ids, p


def sample_draws(rng: np.random.Generator, cfg: SamplingConfig, n: int) -> None:
    """Move `rng` on as `n` calls of `sample` would: a resumed request samples as if never stopped."""
    if cfg.temperature > 0:
        rng.random(n)
