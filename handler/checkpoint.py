"""Load an openai-whisper checkpoint file onto a device, in the precision that device wants.

A checkpoint is {"dims", "model_state_dict", optionally "alignment_heads"} as written by
scripts/download_model.py (or OpenAI's own .pt files). On CUDA the weights stay fp16, as
shipped, except LayerNorm's, which stay fp32: whisper's LayerNorm runs in fp32 on an fp32
copy of its input, while its Linear and Conv1d cast their weights to the input's dtype on
every call; fp16 weights make that cast a no-op instead of a copy per call. On CPU, fp32.
The engine's runner then lays the model out for itself (runner.prepare_model: on CUDA
its LayerNorms run in fp16 as well).
"""

from typing import Optional, Union

import torch
from torch import nn
from whisper.model import ModelDimensions, Whisper


class CheckpointLoadError(RuntimeError):
    """The checkpoint file is missing, unreadable or not an openai-whisper checkpoint."""


def read_checkpoint(path: str) -> dict:
    """The checkpoint dict, on CPU; weights_only so that no pickled code can run."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointLoadError(
            f"{path}: no such file (scripts/download_model.py writes it)"
        ) from None
    except Exception as e:  # a corrupt zip or pickle raises many kinds
        raise CheckpointLoadError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(checkpoint, dict) or not {"dims", "model_state_dict"} <= set(checkpoint):
        raise CheckpointLoadError(f"{path}: not an openai-whisper checkpoint (needs dims, model_state_dict)")
    return checkpoint


def load_whisper(
    path: str, device: Union[str, torch.device] = "cpu", fp16: Optional[bool] = None
) -> Whisper:
    """Build the Whisper model in `path` on `device`, in eval mode.

    fp16 defaults to True on CUDA (LayerNorm kept fp32) and False elsewhere (all fp32).
    """
    device = torch.device(device)
    if fp16 is None:
        fp16 = device.type == "cuda"
    checkpoint = read_checkpoint(path)
    model = Whisper(ModelDimensions(**checkpoint["dims"]))
    try:
        model.load_state_dict(checkpoint["model_state_dict"])
    except RuntimeError as e:
        raise CheckpointLoadError(f"{path}: weights do not fit its dims: {e}") from None
    if checkpoint.get("alignment_heads") is not None:
        model.set_alignment_heads(checkpoint["alignment_heads"])
    del checkpoint

    if fp16:
        model.half()
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.float()
    else:
        model.float()
    return model.to(device).eval()


def describe(model: Whisper) -> dict:
    """A one-line-loggable summary: dims, parameter count, languages, dtypes, device."""
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    return {
        "dims": dict(vars(model.dims)),
        "params": sum(p.numel() for p in model.parameters()),
        "multilingual": model.is_multilingual,
        "languages": model.num_languages,
        "alignment_heads": int(model.alignment_heads.to_dense().sum()),
        "dtypes": dtypes,
        "device": str(model.device),
    }
