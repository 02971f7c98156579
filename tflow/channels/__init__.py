"""The channels senders talk to the receiver over, one module each, run by `tflow.communicate`.

`none` (the receiver alone), `text` (TextMAS), `weights` (TFlow), `kv` (DiffMAS; LatentMAS when
its LoRA is untrained) and `latent` (RecursiveMAS). Every channel shares one ledger
(`tflow.channels.ledger`), one stage timer and one `Reply`.
"""

from tflow.channels.dispatch import communicate, sender_names
from tflow.channels.registry import Call, available, register

# isort: off
# Imported in this order so their @register calls fill the registry; the order is CHANNELS.
from tflow.channels import none, text, weights, kv, latent  # noqa: E402, F401
# isort: on
from tflow.channels.text import text_turn  # noqa: E402
from tflow.channels.weights import guard_delta  # noqa: E402

CHANNELS = available()

__all__ = ["CHANNELS", "Call", "communicate", "guard_delta", "register", "sender_names", "text_turn"]
