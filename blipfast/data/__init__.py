"""Stage-1 data: annotation readers, the caption tokenizer, the frozen vision tower, image and cached-feature
datasets, the feature cache (``blipfast cache-features``) and the synthetic set of ``blipfast train``."""
from .annotations import Annotations, Gallery, pre_caption, read_annotations, read_gallery
from .datasets import FeatureTextDataset, GlobalBatchSampler, ImageTextDataset, collate
from .features import FeatureCache, cache_features
from .tokenizer import load_tokenizer, tokenize, train_wordpiece
from .vision import ImageReadError, VisionTower, load_image, load_vision_tower

__all__ = ["Annotations", "FeatureCache", "FeatureTextDataset", "Gallery", "GlobalBatchSampler", "ImageReadError",
           "ImageTextDataset", "VisionTower", "cache_features", "collate", "load_image", "load_tokenizer",
           "load_vision_tower", "pre_caption", "read_annotations", "read_gallery", "tokenize", "train_wordpiece"]
