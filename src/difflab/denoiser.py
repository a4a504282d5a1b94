"""The denoiser every sampler sees: eps = denoiser(x_t, t, y), over a diffusers UNet2DModel."""

from __future__ import annotations

from diffusers import UNet2DModel
from torch import Tensor, nn

from difflab.errors import ConfigError


def downsampling_factor(unet: UNet2DModel) -> int:
    """How much the UNet shrinks its input: 2 per down block but the last (diffusers' layout)."""
    return 2 ** (len(unet.config.block_out_channels) - 1)


class UNetDenoiser(nn.Module):
    """Adapter from diffusers' ``UNet2DModel(x, t, class_labels).sample`` to ``eps = f(x_t, t, y)``."""

    def __init__(self, unet: UNet2DModel) -> None:
        super().__init__()
        factor = downsampling_factor(unet)
        size = unet.config.sample_size
        sizes = size if isinstance(size, (list, tuple)) else (size, size)
        if any(s % factor for s in sizes):
            raise ConfigError(
                f"image size {size} is not divisible by the UNet's downsampling factor {factor} "
                f"({len(unet.config.block_out_channels)} down blocks): use a multiple of {factor}, "
                f"or a model with fewer blocks"
            )
        self.unet = unet

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image the UNet denoises."""
        size = self.unet.config.sample_size
        h, w = size if isinstance(size, (list, tuple)) else (size, size)
        return (self.unet.config.in_channels, h, w)

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """eps_theta(x_t, t[, y]); x_t (B, C, H, W), t (B,) long, y (B,) long class ids or None.

        An unconditional UNet ignores y (classifier guidance passes labels to the classifier only).
        """
        return self.unet(x_t, t, class_labels=y if self.unet.class_embedding is not None else None).sample
