"""Checks of the decoder shared by the tests and scripts/gpu_check.py (not used in serving).

`decode_windows` decodes whole windows with one DecodeBatch (what whisper.decode does for
a batch, for comparing the two token for token); `HostSyncs` counts the calls that make
the host wait for the device, `syncs_in_token_loop` those of one chunk of tokens.
"""

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from whisper.tokenizer import Tokenizer

from decoding import DecodeBatch, DecodedWindow, TokenRules


@torch.no_grad()
def decode_windows(
    model,
    audio_features: Tensor,
    initial_tokens: Sequence[Sequence[int]],
    tokenizer: Tokenizer,
    rules: TokenRules,
    temperatures: Union[float, Sequence[float]] = 0.0,
    max_new_tokens: Optional[int] = None,
    seeds: Optional[Sequence[int]] = None,
    tokens_per_step: int = 16,
    cuda_graphs: Optional[bool] = None,
    capture_graphs: bool = False,
    counts: Optional[dict] = None,
) -> List[DecodedWindow]:
    """Decode each row of `audio_features` (n_rows, n_audio_ctx, n_state) after its own
    `initial_tokens` to its end, all rows in one DecodeBatch; results in row order."""
    n_rows = audio_features.shape[0]
    if isinstance(temperatures, (int, float)):
        temperatures = [float(temperatures)] * n_rows
    batch = DecodeBatch(model, tokenizer, rules, max_new_tokens, cuda_graphs=cuda_graphs)
    if capture_graphs:  # cuda: every step shape of this many rows, as the engine does at start-up
        batch.capture_graphs(n_rows, audio_features.dtype)
    batch.add(audio_features, initial_tokens, temperatures, seeds or range(n_rows), range(n_rows))
    results: List[Optional[DecodedWindow]] = [None] * n_rows
    while len(batch):
        for row, result in batch.step(tokens_per_step):
            results[row] = result
    if counts is not None:  # graph_steps, eager_steps, capture_failures, graphs_held
        counts.update(batch.counts, graphs_held=len(batch.graphs))
    return results


class HostSyncs:
    """Counts the tensor calls that make the host wait for the device (item, tolist, cpu,
    numpy, bool/int/float of a tensor, nonzero) inside a `with` block; on CUDA the same
    calls are the syncs, so the count is meaningful on CPU too."""

    SYNCS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"}

    def __init__(self):
        class Mode(torch.overrides.TorchFunctionMode):
            def __torch_function__(mode, func, types, args=(), kwargs=None):
                if self.counting and getattr(func, "__name__", "") in self.SYNCS:
                    self.calls.append(func.__name__)
                return func(*args, **(kwargs or {}))

        self.calls, self.counting, self._mode = [], True, Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def syncs_in_token_loop(batch, tokens: int) -> list:
    """The host syncs of `batch.step(tokens)` before its end-of-chunk read (_retire)."""
    counter, retire = HostSyncs(), batch._retire

    def retire_uncounted(*args):
        counter.counting = False
        return retire(*args)

    batch._retire = retire_uncounted
    try:
        with counter:
            batch.step(tokens)
    finally:
        batch._retire = retire
    return counter.calls
