"""Agents: role-prompted senders and the receiver, how they read text (encoding, role prefixes, KV traces) and how they generate."""
