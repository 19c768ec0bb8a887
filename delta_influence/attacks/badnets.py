"""BadNets: a dirty-label patch trigger."""

from dataclasses import dataclass

import torch
from torch import Tensor

from delta_influence.attacks.base import AttackContext, LabeledImages, Trigger, TriggerAttack
from delta_influence.errors import ConfigError


@dataclass(frozen=True)
class BadNets(TriggerAttack):
    """BadNets patch trigger (Gu et al., 2017): a few pixels set to a fixed value in every channel.

    The default is the Δ-Influence paper's CIFAR-10 setting: 500 ships relabelled as dogs, four black pixels near
    the bottom-right corner.

    Example:
        >>> import torch
        >>> attack = BadNets(pixels=((0, 1),), value=1.0)
        >>> attack.apply_trigger(torch.zeros(1, 2, 2))[0]
        tensor([[0., 1.],
                [0., 0.]])
    """

    victim: int | str = 8  # class (index or name) whose samples are poisoned (CIFAR-10: ship)
    target: int | str = 5  # class (index or name) the poisons are labelled and the attack wants (CIFAR-10: dog)
    num_poisons: int = 500
    pixels: tuple[tuple[int, int], ...] = ((28, 30), (30, 30), (29, 29), (30, 28))  # (row, column)
    value: float = 0.0  # trigger intensity in [0, 1] pixel space, all channels

    def __post_init__(self) -> None:
        if not self.pixels:
            raise ConfigError("attack.pixels is empty: give at least one (row, column) pair for the trigger.")
        if not 0.0 <= self.value <= 1.0:
            raise ConfigError(f"attack.value={self.value} is outside [0, 1]: trigger values are pixel intensities.")

    def apply_trigger(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        out = images.clone()
        for row, col in self.pixels:
            if not (0 <= row < height and 0 <= col < width):
                raise ConfigError(
                    f"attack.pixels holds ({row}, {col}), outside the {height}x{width} images; "
                    "use positions inside the image."
                )
            out[..., row, col] = self.value
        return out

    def augmentation_warnings(self, height: int, width: int, crop_padding: int, flip: bool) -> list[str]:
        """Trigger pixels within ``crop_padding`` of an edge (a random crop can cut them off) and, with flips, a
        trigger that is not mirror-symmetric (half the training images then show it mirrored).

        Example:
            >>> BadNets(pixels=((1, 5), (1, 6))).augmentation_warnings(32, 32, crop_padding=2, flip=False)[0][:60]
            'attack.pixels (1, 5), (1, 6) lie within data.crop_padding=2 '
        """
        warnings = []
        pad = crop_padding
        edge = [(r, c) for r, c in self.pixels if min(r, c) < pad or r >= height - pad or c >= width - pad]
        if edge:
            warnings.append(
                f"attack.pixels {', '.join(map(str, edge))} lie within data.crop_padding={pad} pixels of the "
                f"{height}x{width} image's edge: the random crop shifts the trigger and cuts these pixels off in some "
                f"training images, which weakens the backdoor. Move the trigger at least {pad} pixels from the edges, "
                "or lower data.crop_padding."
            )
        mirrored = {(r, width - 1 - c) for r, c in self.pixels}
        if flip and mirrored != set(self.pixels):
            warnings.append(
                f"attack.pixels {', '.join(map(str, self.pixels))} are not mirror-symmetric and data.flip is on: half "
                "the training images show the trigger mirrored (columns c -> "
                f"{width - 1} - c). Use a mirror-symmetric trigger, or set data.flip false."
            )
        return warnings

    def make_trigger(self, train: LabeledImages, context: AttackContext) -> Trigger:
        grey = torch.full(train.images.shape[1:], 0.5)
        return Trigger(self.apply_trigger, media={"trigger": self.apply_trigger(grey)})
