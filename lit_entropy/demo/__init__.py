"""The embedded demo: the Countdown task and a tiny model built, and warmed up, in code (CPU, minutes, no files).

It shows the library end to end on a laptop and gives the tests their models. It is a package of its own because
it is a user of the core, not a part of it: these modules import the core, and the core reaches the demo only
lazily, where a config asks for the tiny model (``policy.embedded``).
"""

from lit_entropy.demo.char_tokenizer import build_char_tokenizer
from lit_entropy.demo.countdown import countdown_format_reward, countdown_reward, generate_countdown_examples
from lit_entropy.demo.data import CountdownDataModule
from lit_entropy.demo.embedded import EmbeddedModel, prepare_embedded_model
from lit_entropy.demo.sft import SFT, supervised_batch
from lit_entropy.demo.tiny_model import build_tiny_causal_lm

__all__ = [
    "SFT",
    "CountdownDataModule",
    "EmbeddedModel",
    "build_char_tokenizer",
    "build_tiny_causal_lm",
    "countdown_format_reward",
    "countdown_reward",
    "generate_countdown_examples",
    "prepare_embedded_model",
    "supervised_batch",
]
