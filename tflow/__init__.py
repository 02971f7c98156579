"""tflow: weight-space communication for teams of LLM agents.

Public names are imported on first use (PEP 562), so `import tflow` and `tflow --help` stay
fast and torch loads only when something needs it.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "CHANNELS": "tflow.channels",
    "communicate": "tflow.channels",
    "AgentUsage": "tflow.reply",
    "Reply": "tflow.reply",
    "Usage": "tflow.reply",
    "Hypernetwork": "tflow.channels.weights.hypernetwork",
    "LoRADelta": "tflow.lora.delta",
    "Receiver": "tflow.agents.agent",
    "Sender": "tflow.agents.agent",
    "ReceiverSpec": "tflow.backbones.families",
    "Team": "tflow.team",
    "load": "tflow.team",
    "patched": "tflow.lora.patching",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tflow' has no attribute {name!r}")


def __dir__():
    return __all__
