"""Write any ``dataset`` option's images (with labels and captions) as WebDataset tar shards for ``dataset=shards``.

    python -m difflab.data.write_shards dataset=image_folder dataset.path=DIR out=SHARDS [latent=vae latent.path=VAE]

Every item of the source, in its order, becomes one sample: ``KEY.png`` (the image as the source serves
it at ``dataset.resolution``, 8-bit), ``KEY.cls``, ``KEY.txt`` when the source has captions, and with
``latent=vae`` the VAE's latent ``KEY.latent.npy`` and the latent of the mirrored image ``KEY.flipped.npy``,
so ``latent=vae dataset=shards dataset.latents=true`` trains without the encoder in the loop.
``dataset.json`` beside the shards records the class names, the image shape and the VAE's fingerprint.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader

from difflab.build.config import instantiate_node
from difflab.data.base import ImageDataModule
from difflab.data.images import batch_as_is
from difflab.data.shards import META_FILE
from difflab.errors import ConfigError

CONF = Path(__file__).resolve().parents[3] / "conf"


def png_bytes(x: torch.Tensor) -> bytes:
    """An image (C, H, W) in [-1, 1] as the bytes of an 8-bit PNG (gray for C=1)."""
    pixels = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(buffer, format="png", compress_level=1)
    return buffer.getvalue()


def npy_bytes(z: torch.Tensor) -> bytes:
    """A tensor as the bytes of a .npy file (float32)."""
    buffer = io.BytesIO()
    np.save(buffer, z.float().numpy(), allow_pickle=False)
    return buffer.getvalue()


def write_shards(
    datamodule: ImageDataModule, out: Path, samples_per_shard: int = 1000, latent=None, num_workers: int = 0
) -> dict:
    """Every item of ``datamodule``'s source into ``out/shard-NNNNNN.tar``; returns the written dataset.json."""
    import webdataset as wds

    if samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard must be a positive integer, got {samples_per_shard}")
    catalog = datamodule.catalog()
    if out.exists() and any(out.glob("*.tar")):
        raise ConfigError(f"out={out} already holds shards: write into a new directory")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"class_names": catalog.class_names, "image_shape": list(datamodule.image_shape), "count": 0,
            "latent": None if latent is None else {"fingerprint": latent.fingerprint, "shape": list(latent.shape),
                                                   "posterior": latent.posterior, "path": latent.path}}
    loader = DataLoader(catalog.items, batch_size=256, num_workers=num_workers, collate_fn=batch_as_is)
    generator = torch.Generator().manual_seed(0)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=samples_per_shard, verbose=0) as sink:
        for images in loader:
            latents = None if latent is None else (latent.encode(images, generator), latent.encode(images.flip(-1)))
            for b, x in enumerate(images):
                i = meta["count"]
                sample = {"__key__": f"{i:09d}", "png": png_bytes(x), "cls": str(int(catalog.labels[i])).encode()}
                if catalog.captions is not None:
                    sample["txt"] = catalog.captions[i].encode()
                if latents is not None:
                    sample["latent.npy"], sample["flipped.npy"] = npy_bytes(latents[0][b]), npy_bytes(latents[1][b])
                sink.write(sample)
                meta["count"] += 1
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return meta


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="write_shards")
def main(cfg: DictConfig) -> None:
    datamodule = instantiate_node(cfg.dataset, "dataset")
    latent = None
    if cfg.latent.get("path"):
        from difflab.latent import LatentSpace

        latent = LatentSpace(cfg.latent.path, datamodule.image_shape, posterior=cfg.latent.posterior)
    start = time.perf_counter()
    meta = write_shards(datamodule, Path(cfg.out), cfg.samples_per_shard, latent, datamodule.num_workers)
    seconds = time.perf_counter() - start
    print(f"wrote {meta['count']} samples to {cfg.out} in {seconds:.1f} s ({meta['count'] / seconds:.0f} samples/s)")


if __name__ == "__main__":
    main()
