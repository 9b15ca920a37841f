"""int8 dynamic quantization of a Whisper model's Linear layers, for CPU inference.

openai-whisper's `Linear` subclasses `nn.Linear` (it casts weights to the input dtype),
so torch's quantize_dynamic does not recognise it; the layers are swapped for plain
`nn.Linear` (same parameters: identical in fp32) and then quantized. Weights become int8,
activations are quantized per batch on the fly; the token embedding, the attention and
the convolutions stay fp32.
"""

import copy
import warnings

import torch
from whisper.model import Linear as WhisperLinear


def _plain_linears(module: torch.nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, WhisperLinear):
            plain = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            plain.weight, plain.bias = child.weight, child.bias
            setattr(module, name, plain)
        else:
            _plain_linears(child)


def quantize_linears(model):
    """A copy of `model` (on cpu, fp32) with int8 dynamically quantized Linear layers."""
    model = copy.deepcopy(model).cpu().float().eval()
    _plain_linears(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notice for eager quantization
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
