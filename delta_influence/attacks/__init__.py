"""Poisoning attacks: each knows which training samples it poisons and how it triggers an input."""

from delta_influence.attacks.base import Attack
from delta_influence.attacks.badnets import BadNets

__all__ = ["Attack", "BadNets"]
