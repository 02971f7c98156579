"""The channels senders talk to the receiver over, one record each in `tflow.channels.registry`.

`none` (the receiver alone), `text` (TextMAS), `weights` (TFlow), `kv` (DiffMAS; LatentMAS when
its LoRA is untrained), `latent` (RecursiveMAS) and `context` (the receiver reading the senders'
documents itself). `none`, `text` and `context` train a receiver LoRA of their own as controls. A channel is one module or folder that
registers a `Channel` record: how it runs and checks a call, its options and recipe sections, its
trained part, its cost in the receiver's context, its ablations and its report label. Every
channel shares one ledger (`tflow.channels.ledger`), one stage timer and one `Reply`.
"""

from tflow.channels.dispatch import communicate, sender_names
from tflow.channels.registry import Call, Channel, available, register

# isort: off
# Imported in this order so their records fill the registry; the order is CHANNELS.
from tflow.channels import none, text, weights, kv, latent, context  # noqa: E402, F401
# isort: on
from tflow.channels.text import text_turn  # noqa: E402
from tflow.channels.weights.run import guard_delta  # noqa: E402

CHANNELS = available()
"""The channels tflow ships, in order (`registry.available()` also lists any registered later)."""

__all__ = ["CHANNELS", "Call", "Channel", "communicate", "guard_delta", "register", "sender_names", "text_turn"]
