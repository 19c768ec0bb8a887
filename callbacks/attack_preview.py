"""AttackPreviewCallback: pictures of the attack in W&B when training starts."""

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import WandbLogger
from typing_extensions import override

from delta_influence.callbacks.media import to_hwc
from delta_influence.errors import ConfigError
from delta_influence.plots import to_displayable


class AttackPreviewCallback(Callback):
    """Logs the attack's pictures (``datamodule.attack_media``, e.g. the trigger contrast-stretched, as
    ``attack/<name>``) and a few poisoned training images (``attack/poisons``) to every W&B logger, once, when the
    fit starts.

    Args:
        num_images: How many poisoned training images to show.
    """

    def __init__(self, num_images: int = 8) -> None:
        if num_images < 0:
            raise ConfigError(f"num_images={num_images} must be 0 or more.")
        self.num_images = num_images

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        data = trainer.datamodule
        if not loggers or not trainer.is_global_zero or data is None:
            return
        pictures = {f"attack/{name}": image[None] for name, image in getattr(data, "attack_media", {}).items()}
        poisons = getattr(data, "poison_indices", torch.zeros(0))[: self.num_images].tolist()
        if poisons:
            images = torch.stack([data.eval_train_set[index][0] for index in poisons])
            pictures["attack/poisons"] = to_displayable(images, data.mean, data.std)
        for logger in loggers:
            for key, images in pictures.items():
                logger.log_image(key, [to_hwc(image) for image in images])
