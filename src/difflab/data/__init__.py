"""DataModules: the bundled digits (default) and a folder of the user's images."""

from difflab.data.base import InMemoryDataModule, ResumableLoader, ShuffledEpochs, TensorImages
from difflab.data.digits import DigitsDataModule, digits_tensor
from difflab.data.image_folder import ImageFolderDataModule

__all__ = [
    "DigitsDataModule", "ImageFolderDataModule", "InMemoryDataModule", "ResumableLoader", "ShuffledEpochs",
    "TensorImages", "digits_tensor",
]
