"""The SAM network, its named configurations, and official-checkpoint I/O."""

from sam_train.model.build import MODEL_SPECS, SamSpec, build_sam, builtin_weights
from sam_train.model.checkpoint import CheckpointError, export_official, load_official, read_state_dict
from sam_train.model.finetune import FinetuneConfig, prepare_finetune
from sam_train.model.lora import merge_lora
from sam_train.model.sam import Sam

__all__ = [
    "MODEL_SPECS",
    "CheckpointError",
    "FinetuneConfig",
    "Sam",
    "SamSpec",
    "build_sam",
    "builtin_weights",
    "export_official",
    "load_official",
    "merge_lora",
    "prepare_finetune",
    "read_state_dict",
]
