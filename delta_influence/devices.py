"""Between a torch device and Lightning's accelerator names: the one place that maps them."""

import torch


def accelerator_of(device: torch.device | str) -> str:
    """Lightning's accelerator name for a torch device.

    Example:
        >>> accelerator_of("cuda:1"), accelerator_of(torch.device("cpu"))
        ('gpu', 'cpu')
    """
    kind = torch.device(device).type
    return "gpu" if kind == "cuda" else kind


def device_of(accelerator: str) -> torch.device:
    """The torch device of a Lightning accelerator name (``"auto"``: a GPU when there is one).

    Example:
        >>> device_of("cpu")
        device(type='cpu')
    """
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda" if accelerator in ("gpu", "cuda") else accelerator)
