"""Batched greedy decoding of 30 s windows with timestamps.

openai-whisper's `decode()` applies its timestamp rules with a Python loop over the
batch and a `.tolist()` per row and step, and a batch runs until its slowest row ends.
This decoder applies the same rules (SuppressBlank, SuppressTokens, ApplyTimestampRules,
GreedyDecoder) as tensor operations on the whole batch, keeps its own key/value caches,
and drops finished rows from the batch so the work shrinks as rows end. Rows may carry
prompts of different lengths (left padding with a key mask). At temperature 0 it gives
the same tokens as `whisper.decode(..., DecodingOptions(temperature=0))`.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from whisper.audio import CHUNK_LENGTH
from whisper.tokenizer import Tokenizer
from whisper.utils import compression_ratio


@dataclass
class DecodedWindow:
    """One row's result; the fields mean what they mean in whisper's DecodingResult."""

    tokens: List[int]  # sampled tokens, without the final <|endoftext|>
    text: str
    sum_logprob: float
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    compression_ratio: float


class TokenRules:
    """The vocabulary facts the rules need; they are the same for every language and task
    of one model, so one instance serves a whole batch."""

    def __init__(self, tokenizer: Tokenizer, n_vocab: int, n_audio_ctx: int, device):
        self.eot = tokenizer.eot
        self.sot = tokenizer.sot
        self.timestamp_begin = tokenizer.timestamp_begin
        self.no_timestamps = tokenizer.no_timestamps
        self.no_speech = tokenizer.no_speech
        self.n_vocab = n_vocab

        # whisper's default suppress_tokens="-1" plus the special tokens it always adds
        suppress = set(tokenizer.non_speech_tokens)
        suppress.update(
            [tokenizer.transcribe, tokenizer.translate, tokenizer.sot,
             tokenizer.sot_prev, tokenizer.sot_lm]
        )
        if tokenizer.no_speech is not None:
            suppress.add(tokenizer.no_speech)
        if tokenizer.no_timestamps is not None:  # ApplyTimestampRules drops it every step
            suppress.add(tokenizer.no_timestamps)
        self.suppress = torch.zeros(n_vocab, dtype=torch.bool)
        self.suppress[sorted(suppress)] = True
        self.suppress = self.suppress.to(device)

        # SuppressBlank: no leading blank and no empty output at the first step
        self.blank = torch.zeros(n_vocab, dtype=torch.bool)
        self.blank[tokenizer.encode(" ") + [tokenizer.eot]] = True
        self.blank = self.blank.to(device)

        precision = CHUNK_LENGTH / n_audio_ctx  # 0.02 s per timestamp token
        self.max_initial_timestamp_index = round(1.0 / precision)
        self.timestamp_index = torch.arange(n_vocab - self.timestamp_begin, device=device)


def apply_rules(
    rules: TokenRules,
    logits: Tensor,
    step: int,
    last: Tensor,
    penultimate: Tensor,
    last_timestamp: Tensor,
) -> None:
    """Mask `logits` (n_rows, n_vocab) in place the way whisper's logit filters do.

    last, penultimate: the last two sampled tokens per row (-1 where there is none);
    last_timestamp: the last sampled timestamp token per row (-1 where there is none).
    """
    neg_inf = -np.inf
    ts_begin = rules.timestamp_begin

    if step == 0:
        logits.masked_fill_(rules.blank, neg_inf)
    logits.masked_fill_(rules.suppress, neg_inf)

    # timestamps come in pairs, except directly before <|endoftext|>
    last_was_ts = last >= ts_begin
    penultimate_was_ts = (penultimate >= ts_begin) | (penultimate < 0)
    pair_open = last_was_ts & ~penultimate_was_ts
    logits[:, : rules.eot].masked_fill_(pair_open[:, None], neg_inf)
    # timestamps never decrease, and a segment has a nonzero length; after a closed
    # pair no timestamp may follow at all
    floor = torch.where(pair_open, last_timestamp, last_timestamp + 1)
    floor = torch.where(last_timestamp >= 0, floor, torch.zeros_like(floor))
    floor = torch.where(last_was_ts & penultimate_was_ts, torch.full_like(floor, 1 << 30), floor)
    timestamps = logits[:, ts_begin:]
    timestamps.masked_fill_(rules.timestamp_index[None, :] < (floor - ts_begin)[:, None], neg_inf)

    if step == 0:
        # the first sampled token is a timestamp, no later than max_initial_timestamp
        logits[:, :ts_begin] = neg_inf
        logits[:, ts_begin + rules.max_initial_timestamp_index + 1 :] = neg_inf

    # when the timestamps together outweigh every text token, sample a timestamp;
    # compared on logits, as the log-softmax normalizer is the same on both sides
    timestamp_mass = timestamps.float().logsumexp(dim=-1)
    max_text = logits[:, :ts_begin].max(dim=-1).values.float()
    logits[:, :ts_begin].masked_fill_((timestamp_mass > max_text)[:, None], neg_inf)


class _Cache:
    """Self-attention keys/values (preallocated) and cross-attention keys/values per layer."""

    def __init__(self, model, audio_features: Tensor, n_rows: int, length: int):
        decoder = model.decoder
        n_state = model.dims.n_text_state
        dtype, device = audio_features.dtype, audio_features.device
        self.self_k = [torch.empty(n_rows, length, n_state, dtype=dtype, device=device)
                       for _ in decoder.blocks]
        self.self_v = [torch.empty_like(k) for k in self.self_k]
        # Stored split into heads and contiguous: attention over a permuted view copies the
        # whole cache at every step (3x slower per step on CPU).
        self.cross_k = [_heads(block.cross_attn.key(audio_features), block.cross_attn.n_head).contiguous()
                        for block in decoder.blocks]
        self.cross_v = [_heads(block.cross_attn.value(audio_features), block.cross_attn.n_head).contiguous()
                        for block in decoder.blocks]

    def keep(self, rows: Tensor) -> None:
        for cache in (self.self_k, self.self_v, self.cross_k, self.cross_v):
            for i, t in enumerate(cache):
                cache[i] = t.index_select(0, rows)


def _heads(x: Tensor, n_head: int) -> Tensor:
    return x.view(*x.shape[:2], n_head, -1).permute(0, 2, 1, 3)


def _attend(q, k, v, n_head, is_causal=False, mask=None, kv_in_heads=False):
    """Multi-head attention; k and v are (rows, n, state), or already (rows, heads, n,
    state / heads) when kv_in_heads."""
    if not kv_in_heads:
        k, v = _heads(k, n_head), _heads(v, n_head)
    a = F.scaled_dot_product_attention(_heads(q, n_head), k, v, attn_mask=mask, is_causal=is_causal)
    return a.permute(0, 2, 1, 3).flatten(start_dim=2)


def _decoder_forward(model, tokens, positions, cache, start, mask, is_causal):
    """Run the text decoder on `tokens` (n_rows, n) written at cache columns
    [start, start + n); returns the hidden states after the final LayerNorm."""
    decoder = model.decoder
    dtype = cache.cross_k[0].dtype
    x = decoder.token_embedding(tokens) + decoder.positional_embedding[positions]
    x = x.to(dtype)
    end = start + tokens.shape[1]
    for i, block in enumerate(decoder.blocks):
        attn = block.attn
        h = block.attn_ln(x)
        cache.self_k[i][:, start:end] = attn.key(h)
        cache.self_v[i][:, start:end] = attn.value(h)
        out = _attend(attn.query(h), cache.self_k[i][:, :end], cache.self_v[i][:, :end],
                      attn.n_head, is_causal=is_causal, mask=mask)
        x = x + attn.out(out)
        cross = block.cross_attn
        h = block.cross_attn_ln(x)
        out = _attend(cross.query(h), cache.cross_k[i], cache.cross_v[i], cross.n_head, kv_in_heads=True)
        x = x + cross.out(out)
        x = x + block.mlp(block.mlp_ln(x))
    return decoder.ln(x)


def _logits(model, hidden: Tensor) -> Tensor:
    weight = model.decoder.token_embedding.weight.to(hidden.dtype)
    return (hidden @ weight.T).float()


def _sample(logits: Tensor, row_temperature: Tensor, active_rows: List[int], sampled: List[int],
            generators) -> Tensor:
    """Greedy tokens for rows at temperature 0; for the `sampled` rows (positions among the
    active rows), argmax(logits / T - log E) with E ~ Exp(1) drawn from the row's own
    generator: a sample from softmax(logits / T) that no other row can influence."""
    next_tokens = logits.argmax(dim=-1)
    noise = torch.stack([
        torch.empty(logits.shape[-1]).exponential_(generator=generators[active_rows[k]])
        for k in sampled
    ]).to(logits.device)
    index = torch.tensor(sampled, device=logits.device)
    scores = logits.index_select(0, index) / row_temperature.index_select(0, index) - noise.log()
    return next_tokens.index_copy(0, index, scores.argmax(dim=-1))


@torch.no_grad()
def decode_windows(
    model,
    audio_features: Tensor,
    initial_tokens: Sequence[Sequence[int]],
    tokenizer: Tokenizer,
    rules: TokenRules,
    temperatures: Union[float, Sequence[float]] = 0.0,
    max_new_tokens: Optional[int] = None,
    sync_every: int = 1,
    generators: Optional[Sequence[Optional[torch.Generator]]] = None,
) -> List[DecodedWindow]:
    """Decode each row of `audio_features` (n_rows, n_audio_ctx, n_state) after its own
    `initial_tokens` ([sot_prev, prompt...,] sot, [language, task]) with timestamps.

    temperatures: one for all rows, or one per row; 0 is greedy. A row sampled at a
    temperature above 0 draws its noise only from its own CPU generator in `generators`
    (the exponential race, equivalent to sampling from softmax(logits / T)), so its
    tokens do not depend on which other rows share the batch.
    sync_every: how many steps between checks for finished rows (each check is one
    device sync); finished rows leave the batch at the next check.
    """
    device = audio_features.device
    n_rows = audio_features.shape[0]
    n_ctx = model.dims.n_text_ctx
    sample_len = max_new_tokens or n_ctx // 2
    eot = rules.eot

    lengths = [len(t) for t in initial_tokens]
    width = max(lengths)
    # whisper stops once the context holds more than n_ctx tokens
    n_steps = min(sample_len, n_ctx + 1 - width)
    padded = torch.full((n_rows, width), eot, dtype=torch.long)
    positions = torch.zeros((n_rows, width), dtype=torch.long)
    sot_index = torch.zeros(n_rows, dtype=torch.long)
    for r, toks in enumerate(initial_tokens):
        pad = width - len(toks)
        padded[r, pad:] = torch.tensor(toks)
        positions[r, pad:] = torch.arange(len(toks))
        sot_index[r] = pad + list(toks).index(rules.sot)
    padded, positions, sot_index = padded.to(device), positions.to(device), sot_index.to(device)
    next_position = torch.tensor(lengths, device=device)

    # left padding: real keys only, and each pad query sees itself so no row is all -inf
    key_mask = None
    if min(lengths) != width:
        is_real = positions > 0
        is_real[torch.arange(n_rows), width - torch.tensor(lengths, device=device)] = True
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        eye = torch.eye(width, dtype=torch.bool, device=device)
        prefill_mask = (causal & is_real[:, None, :]) | eye  # (rows, q, k)
        key_mask = is_real  # (rows, k) for the later steps

    cache = _Cache(model, audio_features, n_rows, width + n_steps)
    hidden = _decoder_forward(
        model, padded, positions, cache, 0,
        mask=None if key_mask is None else prefill_mask[:, None],
        is_causal=key_mask is None,
    )
    rows = torch.arange(n_rows, device=device)
    at_sot = _logits(model, hidden[rows, sot_index][:, None])[:, 0]
    if rules.no_speech is not None:
        no_speech_probs = at_sot.softmax(dim=-1)[:, rules.no_speech]
    else:
        no_speech_probs = torch.full((n_rows,), float("nan"), device=device)
    logits = _logits(model, hidden[:, -1:])[:, 0]

    if isinstance(temperatures, (int, float)):
        temperatures = [float(temperatures)] * n_rows
    temperatures = [float(t) for t in temperatures]
    if generators is None:
        generators = [None] * n_rows
    row_temperature = torch.tensor(temperatures, device=device).clamp(min=1e-6)[:, None]

    # per active row state; `active` maps active rows to original rows (`active_rows`: the
    # same on the host, updated only where the finished-row check syncs anyway)
    active = rows.clone()
    active_rows = list(range(n_rows))
    out_tokens = torch.full((n_rows, n_steps), eot, dtype=torch.long, device=device)
    n_sampled = torch.full((n_rows,), n_steps, dtype=torch.long, device=device)
    sum_logprobs = torch.zeros(n_rows, device=device)
    last = torch.full((n_rows,), -1, dtype=torch.long, device=device)
    penultimate = last.clone()
    last_ts = last.clone()
    done = torch.zeros(n_rows, dtype=torch.bool, device=device)
    steps = torch.arange(n_steps, device=device)

    for step in range(n_steps):
        apply_rules(rules, logits, step, last, penultimate, last_ts)
        sampled = [k for k, r in enumerate(active_rows) if temperatures[r] > 0]
        if not sampled:
            next_tokens = logits.argmax(dim=-1)
        else:
            next_tokens = _sample(logits, row_temperature, active_rows, sampled, generators)
        logprobs = F.log_softmax(logits.float(), dim=-1)  # as whisper, for equal sums
        current = logprobs.gather(1, next_tokens[:, None])[:, 0]
        sum_logprobs.index_add_(0, active, current * ~done)
        next_tokens = torch.where(done, torch.full_like(next_tokens, eot), next_tokens)
        out_tokens[active, step] = next_tokens
        ended = (next_tokens == eot) & ~done
        # no boolean indexing here: it would sync with the device every step
        n_sampled[active] = torch.where(ended, steps[step], n_sampled[active])
        done = done | (next_tokens == eot)

        penultimate, last = last, next_tokens
        last_ts = torch.where(next_tokens >= rules.timestamp_begin, next_tokens, last_ts)
        if step == n_steps - 1:
            break

        if (step + 1) % sync_every == 0:
            # drop finished rows once they are a quarter of the batch: each drop copies
            # the caches of the rows that stay, so dropping one row at a time costs more
            n_done = int(done.sum())
            if n_done == len(done):
                break
            if n_done * 4 < len(done):
                n_done = 0
        else:
            n_done = 0
        if n_done:
            keep = (~done).nonzero()[:, 0]
            active, last, penultimate, last_ts, done, row_temperature = (
                t.index_select(0, keep)
                for t in (active, last, penultimate, last_ts, done, row_temperature)
            )
            active_rows = active.tolist()
            next_position = next_position.index_select(0, keep)
            if key_mask is not None:
                key_mask = key_mask.index_select(0, keep)
            cache.keep(keep)
            next_tokens = next_tokens.index_select(0, keep)

        column = width + step
        step_mask = None
        if key_mask is not None:
            key_mask = torch.cat(
                [key_mask, torch.ones_like(key_mask[:, :1])], dim=1
            )
            step_mask = key_mask[:, None, None, :]
        hidden = _decoder_forward(
            model, next_tokens[:, None], next_position[:, None], cache, column,
            mask=step_mask, is_causal=False,
        )
        next_position = next_position + 1
        logits = _logits(model, hidden[:, -1:])[:, 0]

    out_tokens = out_tokens.cpu()
    n_sampled = n_sampled.tolist()
    sum_logprobs = sum_logprobs.tolist()
    no_speech_probs = no_speech_probs.tolist()
    results = []
    for r in range(n_rows):
        tokens = out_tokens[r, : n_sampled[r]].tolist()
        text = tokenizer.decode(tokens).strip()
        results.append(
            DecodedWindow(
                tokens=tokens,
                text=text,
                sum_logprob=sum_logprobs[r],
                avg_logprob=sum_logprobs[r] / (len(tokens) + 1),
                no_speech_prob=no_speech_probs[r],
                temperature=temperatures[r],
                compression_ratio=compression_ratio(text),
            )
        )
    return results
