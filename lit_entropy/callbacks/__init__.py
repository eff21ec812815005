"""Entropy-control callbacks: each a `lit_entropy.Regularizer` that composes with the others in one Trainer."""

from lit_entropy.callbacks.adapo import ADAPO
from lit_entropy.callbacks.clip_cov import ClipCov
from lit_entropy.callbacks.collapse_guard import CollapseGuard
from lit_entropy.callbacks.completion_log import CompletionLog
from lit_entropy.callbacks.entropy_bonus import AdaptiveEntropyBonus, EntropyBonus
from lit_entropy.callbacks.entropy_constraint import EntropyConstraint
from lit_entropy.callbacks.entropy_law import EntropyLaw
from lit_entropy.callbacks.entropy_monitor import EntropyMonitor
from lit_entropy.callbacks.high_entropy_tokens import HighEntropyTokens
from lit_entropy.callbacks.kl_cov import KLCov
from lit_entropy.callbacks.repo import REPO

__all__ = [
    "ADAPO",
    "REPO",
    "AdaptiveEntropyBonus",
    "ClipCov",
    "CollapseGuard",
    "CompletionLog",
    "EntropyBonus",
    "EntropyConstraint",
    "EntropyLaw",
    "EntropyMonitor",
    "HighEntropyTokens",
    "KLCov",
]
