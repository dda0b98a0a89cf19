"""Backbones: images [B, 3, H, W] in [-1, 1] to unnormalised embeddings [B, embedding_dim].

Build one by name with `create_backbone(name, **kwargs)`; `list_backbones()` names them all;
`backbone_spec(model)` gives the `{"name", "kwargs"}` a checkpoint stores to rebuild it.
Importing this package registers iresnet18/50/100, sfnet4/20/36/64 (with `norm: batch|none`),
mobilefacenet and smallcnn, and arcface_torch's networks under its names (`ARCFACE_TORCH_BACKBONES`:
r18/34/50/100/200, mbf, mbf_large, vit_t/s/b/l/h and the WebFace42M ViTs), whose state_dicts
load arcface_torch's `backbone.pth` files as they are. `load_backbone_weights(name, path, **kwargs)`
builds one from such a file (or an sf2dist checkpoint's backbone), one clear error when it does not fit.
Backbones never use torch.distributed: parallelism is applied from outside.
"""
from sf2dist.models.arcface import ArcFaceIResNet, ArcFaceMobileFaceNet, arcface_keys_from_iresnet
from sf2dist.models.iresnet import IResNet
from sf2dist.models.mobilefacenet import MobileFaceNet
from sf2dist.models.registry import backbone_spec, create_backbone, list_backbones, register_backbone
from sf2dist.models.sfnet import SFNet
from sf2dist.models.small import SmallCNN
from sf2dist.models.vit import VIT_VARIANTS, VisionTransformer
from sf2dist.models.weights import (BackboneWeightsError, check_backbone_weights, load_backbone_weights,
                                    read_backbone_weights)

# Every network name of arcface_torch's backbones.get_model that sf2dist builds, in its order
# (plus vit_l, which it lacks), each with its module names so its state_dicts load strictly.
ARCFACE_TORCH_BACKBONES = ("r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large", *VIT_VARIANTS)

__all__ = [
    "ARCFACE_TORCH_BACKBONES",
    "ArcFaceIResNet",
    "BackboneWeightsError",
    "ArcFaceMobileFaceNet",
    "IResNet",
    "MobileFaceNet",
    "SFNet",
    "SmallCNN",
    "VisionTransformer",
    "arcface_keys_from_iresnet",
    "backbone_spec",
    "check_backbone_weights",
    "create_backbone",
    "list_backbones",
    "load_backbone_weights",
    "read_backbone_weights",
    "register_backbone",
]
