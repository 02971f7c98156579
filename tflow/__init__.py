"""tflow: weight-space communication for teams of LLM agents."""

from tflow.delta import LoRADelta
from tflow.patching import patched
from tflow.spec import ReceiverSpec

__version__ = "0.1.0"

__all__ = ["LoRADelta", "ReceiverSpec", "patched", "__version__"]
