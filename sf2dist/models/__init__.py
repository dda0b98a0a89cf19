"""Backbones: images [B, 3, H, W] in [-1, 1] to unnormalised embeddings [B, embedding_dim].

Build one by name with `create_backbone(name, **kwargs)`; `list_backbones()` names them all;
`backbone_spec(model)` gives the `{"name", "kwargs"}` a checkpoint stores to rebuild it.
Importing this package registers iresnet18/50/100, sfnet4/20/36/64 (with `norm: batch|none`),
mobilefacenet and smallcnn.
Backbones never use torch.distributed: parallelism is applied from outside.
"""
from sf2dist.models.iresnet import IResNet
from sf2dist.models.mobilefacenet import MobileFaceNet
from sf2dist.models.registry import backbone_spec, create_backbone, list_backbones, register_backbone
from sf2dist.models.sfnet import SFNet
from sf2dist.models.small import SmallCNN

__all__ = [
    "IResNet",
    "MobileFaceNet",
    "SFNet",
    "SmallCNN",
    "backbone_spec",
    "create_backbone",
    "list_backbones",
    "register_backbone",
]
