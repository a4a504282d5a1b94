"""The network and the denoiser every sampler sees: pred = denoiser(x_t, t, abar_t, y), over a diffusers UNet2DModel."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import UNet2DModel
from torch import Tensor, nn

from difflab.errors import ConfigError
from difflab.objectives import Objective, Prediction


def downsampling_factor(unet: UNet2DModel) -> int:
    """How much the UNet shrinks its input: 2 per down block but the last (diffusers' layout)."""
    return 2 ** (len(unet.config.block_out_channels) - 1)


class UNetDenoiser(nn.Module):
    """Adapter from diffusers' ``UNet2DModel(x, t, class_labels).sample`` to ``output = f(x_t, t, y)``.

    The UNet's channels: ``in_channels`` = C (2C with self-conditioning: x_t and the previous x0_hat),
    ``out_channels`` = C (2C with a learned variance: the prediction and nu). With a ``text_encoder``
    (conditioning=text) y is token ids (B, L) and the UNet (a UNet2DConditionModel) cross-attends to the
    encoder's last hidden states (B, L, D); the encoder is part of the network (trained, averaged, saved with it).
    """

    def __init__(
        self, unet: UNet2DModel, learn_variance: bool = False, self_condition: bool = False,
        text_encoder: nn.Module | None = None,
    ) -> None:
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
        channels = unet.config.out_channels // (2 if learn_variance else 1)
        if unet.config.in_channels != channels * (2 if self_condition else 1):
            raise ConfigError(
                f"UNet in_channels={unet.config.in_channels} and out_channels={unet.config.out_channels} do not fit "
                f"{channels}-channel data with learn_variance={learn_variance}, self_condition={self_condition}"
            )
        self.unet, self.learn_variance, self.self_condition = unet, learn_variance, self_condition
        self.text_encoder = text_encoder

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample the UNet denoises."""
        size = self.unet.config.sample_size
        h, w = size if isinstance(size, (list, tuple)) else (size, size)
        return (self.unet.config.out_channels // (2 if self.learn_variance else 1), h, w)

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The raw output (B, C or 2C, H, W); x_t (B, C or 2C, H, W), t (B,), y (B,) long class ids or None.

        An unconditional UNet ignores y (classifier guidance passes labels to the classifier only); with a text
        encoder y is token ids (B, L).
        """
        if self.text_encoder is not None:
            return self.unet(x_t, t, encoder_hidden_states=self.text_encoder(y).last_hidden_state).sample
        return self.unet(x_t, t, class_labels=y if self.unet.class_embedding is not None else None).sample


class PredictionDenoiser:
    """pred = f(x_t, t, abar_t, y): the network's output read as a :class:`Prediction` of ``objective``.

    ``color`` maps the sampler's (white) state to the network's input (shaped noise: x = A y; None:
    the identity); ``whiten`` maps the network's output to the sampler's coordinates (``prediction_space=data``:
    the UNet predicts A z, read as z = A^-1 (A z); None: its output is white already). ``autocast``: the
    network's dtype under autocast (sampling in bf16). With a learned variance the output's second half is v in
    [-1, 1] and nu = (v + 1) / 2 (improved-diffusion). With self-conditioning (Chen et al. 2022) the network also
    sees the previous call's x0_hat (zeros at the first call): one instance serves one sampling run.
    """

    def __init__(
        self, net: UNetDenoiser, objective: Objective, color: Callable[[Tensor], Tensor] | None = None,
        autocast: torch.dtype | None = None, whiten: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.net, self.objective, self.color, self.autocast, self.whiten = net, objective, color, autocast, whiten
        self.previous_x0: Tensor | None = None

    def network(self, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        """The raw output in float32; with ``autocast`` (bf16) only the network runs in that precision, the
        sampler's schedule math around it stays float64 / float32."""
        if self.autocast is None:
            return self.net(x, t, y)
        with torch.autocast(x.device.type, dtype=self.autocast):
            return self.net(x, t, y).float()

    def network_input(self, x_t: Tensor, x0_self_cond: Tensor | None = None) -> Tensor:
        """What the UNet sees: color(x_t), and with self-conditioning color(x0_hat) beside it (zeros if None)."""
        x = x_t if self.color is None else self.color(x_t)
        if not self.net.self_condition:
            return x
        cond = torch.zeros_like(x) if x0_self_cond is None else (x0_self_cond if self.color is None else self.color(x0_self_cond))
        return torch.cat([x, cond], dim=1)

    def read(self, output: Tensor, x_t: Tensor, abar_t: Tensor) -> Prediction:
        """The Prediction of a raw network output at (x_t, abar_t (B,))."""
        frac = None
        if self.net.learn_variance:
            output, v = output.chunk(2, dim=1)
            frac = (v + 1) / 2
        if self.whiten is not None:
            output = self.whiten(output)
        return Prediction(output, self.objective, x_t, abar_t.reshape(-1, *([1] * (x_t.ndim - 1))), frac)

    def __call__(self, x_t: Tensor, t: Tensor, abar_t: Tensor, y: Tensor | None) -> Prediction:
        previous = self.previous_x0 if self.previous_x0 is not None and len(self.previous_x0) == len(x_t) else None
        pred = self.read(self.network(self.network_input(x_t, previous), t, y), x_t, abar_t)
        if self.net.self_condition:
            self.previous_x0 = pred.x0.detach()
        return pred
