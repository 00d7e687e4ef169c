"""Everything about the models' inputs and outputs that is not the network itself.

* preprocess — `Recipe` (resize / scale / mean / std / channel order) and `preprocess()`
* images     — safe `load_image()` of user files, any PIL mode → RGB
* labels     — class names and palettes (imagenet, cifar10, camvid), shipped as package data
* registry   — pretrained models recognised by sha256, with their recipes
* datasets   — image folders and their labels (labels.tsv, ImageFolder, segmentation pairs)
"""
from bdecomp.models.datasets import (
    LabelledImage,
    classification_set,
    detect,
    iter_batches,
    list_images,
    load_label_mask,
    segmentation_set,
    spread,
)
from bdecomp.models.images import IMAGE_EXTENSIONS, load_image
from bdecomp.models.labels import class_names, palette
from bdecomp.models.preprocess import TORCHVISION, Recipe, preprocess, recipe_with_overrides
from bdecomp.models.registry import KNOWN, KnownModel, by_name, file_sha256, identify

__all__ = [
    "IMAGE_EXTENSIONS", "KNOWN", "KnownModel", "LabelledImage", "Recipe", "TORCHVISION",
    "by_name", "class_names", "classification_set", "detect", "file_sha256", "identify",
    "iter_batches", "list_images", "load_image", "load_label_mask", "palette", "preprocess",
    "recipe_with_overrides", "segmentation_set", "spread",
]
