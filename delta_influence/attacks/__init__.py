"""Poisoning attacks: each knows which training samples it poisons and how it triggers an input."""

from delta_influence.attacks.badnets import BadNets
from delta_influence.attacks.base import Attack

__all__ = ["Attack", "BadNets"]
