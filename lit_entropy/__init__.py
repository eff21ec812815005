"""lit_entropy: PyTorch Lightning RL fine-tuning of language models that keeps the policy's entropy alive."""

from lit_entropy.arithmetic import ArithmeticDataModule
from lit_entropy.data import PromptDataModule
from lit_entropy.demo import SFT, CountdownDataModule, EmbeddedModel
from lit_entropy.dynamic_sampling import DynamicSampling
from lit_entropy.errors import ConfigError, DataError, LitEntropyError, ModelLoadError
from lit_entropy.loss import Loss
from lit_entropy.model import LoRA, Policy, Quantization
from lit_entropy.module import GRPO
from lit_entropy.progress import RLProgressBar
from lit_entropy.regularizer import Adjustment, IterationOutputs, MinibatchView, Regularizer, Replacements
from lit_entropy.resumable_checkpoint import ResumableCheckpoint
from lit_entropy.reward_scorer import RewardFailureError
from lit_entropy.reward_spec import Reward
from lit_entropy.rollout import Rollout, Sampling

__version__ = "0.1.0"

__all__ = [
    "GRPO",
    "SFT",
    "Adjustment",
    "ArithmeticDataModule",
    "ConfigError",
    "CountdownDataModule",
    "DataError",
    "DynamicSampling",
    "EmbeddedModel",
    "IterationOutputs",
    "LitEntropyError",
    "LoRA",
    "Loss",
    "MinibatchView",
    "ModelLoadError",
    "Replacements",
    "ResumableCheckpoint",
    "Policy",
    "PromptDataModule",
    "Quantization",
    "RLProgressBar",
    "Regularizer",
    "Reward",
    "RewardFailureError",
    "Rollout",
    "Sampling",
]
