"""tflow: weight-space communication for teams of LLM agents."""

from tflow.agents import Receiver, Sender
from tflow.communicate import CHANNELS, communicate
from tflow.delta import LoRADelta
from tflow.hypernetwork import Hypernetwork
from tflow.patching import patched
from tflow.reply import AgentUsage, Reply, Usage
from tflow.spec import ReceiverSpec

__version__ = "0.1.0"

__all__ = [
    "CHANNELS",
    "AgentUsage",
    "Hypernetwork",
    "LoRADelta",
    "Receiver",
    "ReceiverSpec",
    "Reply",
    "Sender",
    "Usage",
    "communicate",
    "patched",
    "__version__",
]
