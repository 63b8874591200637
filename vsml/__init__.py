"""vsml: Variable Shared Meta Learning (Kirsch & Schmidhuber 2021) in PyTorch + Triton."""

from .engine.config import ConfigError, SubLSTMConfig, VSMLConfig
from .engine.network import VSMLNetwork
from .engine.params import init_theta, theta_size, unflatten
from .engine.state import EpisodeOutput, VSMLState, init_state

__all__ = [
    "ConfigError", "SubLSTMConfig", "VSMLConfig", "EpisodeOutput", "VSMLNetwork", "VSMLState",
    "init_state", "init_theta", "theta_size", "unflatten",
]
__version__ = "0.1.0"
