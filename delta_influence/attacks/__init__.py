"""Poisoning attacks: each turns clean data into poisoned training data and the set that measures its success."""

from delta_influence.attacks.badnets import BadNets
from delta_influence.attacks.base import Attack, AttackContext, LabeledImages, PoisonedData, Trigger, TriggerAttack
from delta_influence.attacks.smooth_trigger import SmoothTrigger
from delta_influence.attacks.witches_brew import WitchesBrew

__all__ = [
    "Attack",
    "AttackContext",
    "BadNets",
    "LabeledImages",
    "PoisonedData",
    "SmoothTrigger",
    "Trigger",
    "TriggerAttack",
    "WitchesBrew",
]
