"""DataModules: the bundled digits (default), a folder of images, CIFAR-10/100, Hugging Face datasets, shards."""

from difflab.data.base import Catalog, ImageDataModule
from difflab.data.digits import DigitsDataModule, digits_tensor
from difflab.data.image_folder import ImageFolderDataModule
from difflab.data.images import LazyImages, TensorImages
from difflab.data.order import ResumableLoader, ShuffledEpochs

__all__ = [
    "Catalog", "DigitsDataModule", "ImageDataModule", "ImageFolderDataModule", "LazyImages", "ResumableLoader",
    "ShuffledEpochs", "TensorImages", "digits_tensor",
]
