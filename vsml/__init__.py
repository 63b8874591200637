"""vsml: Variable Shared Meta Learning (Kirsch & Schmidhuber 2021) in PyTorch + Triton."""

from .config import ConfigError, SubLSTMConfig, VSMLConfig
from .network import EpisodeOutput, VSMLNetwork
from .params import init_theta, theta_size, unflatten
from .state import VSMLState, init_state

__all__ = [
    "ConfigError", "SubLSTMConfig", "VSMLConfig", "EpisodeOutput", "VSMLNetwork", "VSMLState",
    "init_state", "init_theta", "theta_size", "unflatten",
]
__version__ = "0.1.0"
