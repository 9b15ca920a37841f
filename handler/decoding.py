"""Continuous batched decoding of 30 s windows with timestamps.

openai-whisper's `decode()` applies its timestamp rules with a Python loop over the
batch and a `.tolist()` per row and step, and a batch runs until its slowest row ends.
Here a `DecodeBatch` holds rows that decode side by side, each at its own temperature:
rows join between chunks of tokens (`add`: their prompts are prefilled and merged into
the running batch, left-padded to its cache column), run `step(n)` tokens at a time, and
leave as soon as they end (`step` returns the finished rows), so a window that arrives
while others decode does not wait for them, and finished rows are refilled. Whisper's
rules (SuppressBlank, SuppressTokens, ApplyTimestampRules, greedy or sampled) are tensor
operations on the whole batch; there is no host sync inside a chunk. At temperature 0 a
row gets the same tokens as `whisper.decode(..., DecodingOptions(temperature=0))`,
whatever else shares its batch.
"""

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

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


def _heads(x: Tensor, n_head: int) -> Tensor:
    return x.view(*x.shape[:2], n_head, -1).permute(0, 2, 1, 3)


def _attend(q, k, v, n_head, is_causal=False, mask=None, kv_in_heads=False):
    """Multi-head attention of q (rows, n_q, state) over k and v, which are (rows, n_k,
    state), or already (rows, heads, n_k, state / heads) when kv_in_heads; mask: boolean,
    broadcast to (rows, heads, n_q, n_k), True where a query may look.

    Two matmuls and an fp32 softmax rather than scaled_dot_product_attention: a decode
    step has one query per row, where the cpu's flash kernel is 1.3x slower in fp32 and
    6x slower in bf16 (16 rows over 1500 audio positions, docs/benchmarks.md)."""
    if not kv_in_heads:
        k, v = _heads(k, n_head), _heads(v, n_head)
    q = _heads(q, n_head)
    weights = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if is_causal:
        n_q, n_k = weights.shape[-2:]
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
    if mask is not None:
        weights.masked_fill_(~mask, -np.inf)
    a = weights.softmax(dim=-1).to(v.dtype) @ v
    return a.permute(0, 2, 1, 3).flatten(start_dim=2)


class _Cache:
    """Per decoder layer: self-attention keys/values (rows, columns, state) and the
    cross-attention keys/values of the rows' audio, split into heads and contiguous
    (attention over a permuted view copies the whole cache at every step: 3x slower per
    step on CPU)."""

    def __init__(self, self_k, self_v, cross_k, cross_v):
        self.self_k, self.self_v, self.cross_k, self.cross_v = self_k, self_v, cross_k, cross_v

    @classmethod
    def for_audio(cls, model, audio_features: Tensor, columns: int) -> "_Cache":
        decoder = model.decoder
        n_rows, dtype, device = audio_features.shape[0], audio_features.dtype, audio_features.device
        n_state = model.dims.n_text_state
        self_k = [torch.zeros(n_rows, columns, n_state, dtype=dtype, device=device) for _ in decoder.blocks]
        self_v = [torch.zeros_like(k) for k in self_k]
        cross_k = [_heads(b.cross_attn.key(audio_features), b.cross_attn.n_head).contiguous()
                   for b in decoder.blocks]
        cross_v = [_heads(b.cross_attn.value(audio_features), b.cross_attn.n_head).contiguous()
                   for b in decoder.blocks]
        return cls(self_k, self_v, cross_k, cross_v)

    def keep(self, rows: Tensor) -> None:
        for cache in (self.self_k, self.self_v, self.cross_k, self.cross_v):
            for i, t in enumerate(cache):
                cache[i] = t.index_select(0, rows)

    def columns(self, start: int, end: int, pad_left: int = 0) -> "_Cache":
        """Self-attention columns [start, end) with `pad_left` zero columns before them and
        enough after to reach end - start + pad_left; cross-attention as is."""
        def cut(t):
            part = t[:, start:end]
            return F.pad(part, (0, 0, pad_left, 0)) if pad_left else part.contiguous()
        return _Cache([cut(t) for t in self.self_k], [cut(t) for t in self.self_v],
                      self.cross_k, self.cross_v)

    def grow(self, columns: int) -> None:
        """Room for `columns` self-attention columns in all."""
        extra = columns - self.self_k[0].shape[1]
        if extra > 0:
            self.self_k = [F.pad(t, (0, 0, 0, extra)) for t in self.self_k]
            self.self_v = [F.pad(t, (0, 0, 0, extra)) for t in self.self_v]

    @staticmethod
    def cat(a: "_Cache", b: "_Cache") -> "_Cache":
        return _Cache(*([torch.cat([x, y]) for x, y in zip(p, q)]
                        for p, q in ((a.self_k, b.self_k), (a.self_v, b.self_v),
                                     (a.cross_k, b.cross_k), (a.cross_v, b.cross_v))))


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


def _sample(logits: Tensor, row_temperature: Tensor, sampled: Optional[Tensor], generators) -> Tensor:
    """Greedy tokens for rows at temperature 0; for the rows in `sampled` (an index tensor
    on the logits' device, None: no row samples), argmax(logits / T - log E) with E ~ Exp(1)
    drawn from the row's own generator (on the same device: no copy from the host): a
    sample from softmax(logits / T) that no other row can influence."""
    next_tokens = logits.argmax(dim=-1)
    if sampled is None:
        return next_tokens
    noise = torch.stack([torch.empty(logits.shape[-1], device=logits.device).exponential_(generator=g)
                         for g in generators])
    scores = logits.index_select(0, sampled) / row_temperature.index_select(0, sampled) - noise.log()
    return next_tokens.index_copy(0, sampled, scores.argmax(dim=-1))


# per-row state tensors, kept in this order through joins and compaction
_ROW_STATE = ("next_tokens", "next_position", "key_mask", "out_tokens", "row_step", "n_steps",
              "n_sampled", "sum_logprobs", "no_speech", "last", "penultimate", "last_ts", "done",
              "row_temperature")


class DecodeBatch:
    """Rows decoding side by side, joining and leaving between chunks of tokens.

        batch = DecodeBatch(model, tokenizer, rules)
        batch.add(features, initial_tokens, temperatures, generators, tags)
        while len(batch):
            for tag, result in batch.step(16): ...   # rows that ended in those 16 tokens

    features: (n, n_audio_ctx, n_audio_state); initial_tokens: per row [sot_prev, prompt...,]
    sot, [language, task]; a row sampled at a temperature above 0 draws from its own
    generator, on the features' device. Tags are the caller's: they come back with the
    results. Inside a chunk of tokens nothing waits for the device (tests/unit/
    test_decoding.py counts the host syncs): `step` reads the rows' state once, at the end.
    """

    def __init__(self, model, tokenizer: Tokenizer, rules: TokenRules, max_new_tokens: Optional[int] = None):
        self.model, self.tokenizer, self.rules = model, tokenizer, rules
        self.n_ctx = model.dims.n_text_ctx
        self.sample_len = max_new_tokens or self.n_ctx // 2
        self.tags: List[Any] = []
        self.temperatures: List[float] = []
        self.generators: List[Optional[torch.Generator]] = []
        self.cache: Optional[_Cache] = None
        self.column = 0  # the cache column the next token is written to
        self.horizon = 0  # tokens after which every row has ended (the cache has room for them)

    def __len__(self) -> int:
        return len(self.tags)

    @torch.no_grad()
    def add(self, audio_features: Tensor, initial_tokens: Sequence[Sequence[int]],
            temperatures: Sequence[float], generators: Sequence[Optional[torch.Generator]],
            tags: Sequence[Any]) -> None:
        """Prefill new rows, sample their first token, and merge them into the batch."""
        model, rules = self.model, self.rules
        device = audio_features.device
        n_rows = audio_features.shape[0]
        lengths = [len(t) for t in initial_tokens]
        width = max(lengths)
        padded = torch.full((n_rows, width), rules.eot, dtype=torch.long)
        positions = torch.zeros((n_rows, width), dtype=torch.long)
        sot_index = torch.zeros(n_rows, dtype=torch.long)
        for r, toks in enumerate(initial_tokens):
            pad = width - len(toks)
            padded[r, pad:] = torch.tensor(toks)
            positions[r, pad:] = torch.arange(len(toks))
            sot_index[r] = pad + list(toks).index(rules.sot)
        padded, positions, sot_index = padded.to(device), positions.to(device), sot_index.to(device)
        # left padding: real keys only, and each pad query sees itself so no row is all -inf
        is_real = positions > 0
        is_real[torch.arange(n_rows), width - torch.tensor(lengths, device=device)] = True
        mask = None
        if min(lengths) != width:
            causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
            eye = torch.eye(width, dtype=torch.bool, device=device)
            mask = ((causal & is_real[:, None, :]) | eye)[:, None]  # (rows, 1, q, k)

        cache = _Cache.for_audio(model, audio_features, width)
        hidden = _decoder_forward(model, padded, positions, cache, 0, mask=mask, is_causal=mask is None)
        rows = torch.arange(n_rows, device=device)
        at_sot = _logits(model, hidden[rows, sot_index][:, None])[:, 0]
        if rules.no_speech is not None:
            no_speech = at_sot.softmax(dim=-1)[:, rules.no_speech]
        else:
            no_speech = torch.full((n_rows,), float("nan"), device=device)
        logits = _logits(model, hidden[:, -1:])[:, 0]

        # whisper stops once the context holds more than n_ctx tokens
        n_steps = torch.tensor([min(self.sample_len, self.n_ctx + 1 - n) for n in lengths], device=device)
        none = torch.full((n_rows,), -1, dtype=torch.long, device=device)
        new = {
            "next_position": torch.tensor(lengths, device=device),
            "key_mask": is_real,
            "out_tokens": torch.full((n_rows, self.sample_len), rules.eot, dtype=torch.long, device=device),
            "row_step": torch.zeros(n_rows, dtype=torch.long, device=device),
            "n_steps": n_steps,
            "n_sampled": n_steps.clone(),
            "sum_logprobs": torch.zeros(n_rows, device=device),
            "no_speech": no_speech,
            "last": none, "penultimate": none.clone(), "last_ts": none.clone(),
            "done": torch.zeros(n_rows, dtype=torch.bool, device=device),
            "row_temperature": torch.tensor([float(t) for t in temperatures], device=device).clamp(min=1e-6)[:, None],
        }
        new["next_tokens"] = self._sample_step(new, logits, 0, *self._sampled_rows(temperatures, generators, device))
        self._merge(new, cache, width)
        self.tags += list(tags)
        self.temperatures += [float(t) for t in temperatures]
        self.generators += list(generators)

    @staticmethod
    def _sampled_rows(temperatures, generators, device) -> Tuple[Optional[Tensor], List]:
        """The rows that sample (an index tensor on `device`, None when none do) and their
        generators, made once per chunk of tokens: nothing goes from the host per token."""
        rows = [k for k, t in enumerate(temperatures) if t > 0]
        if not rows:
            return None, []
        return torch.tensor(rows, device=device), [generators[k] for k in rows]

    def _sample_step(self, state: dict, logits: Tensor, step: int, sampled, generators) -> Tensor:
        """Apply the rules, sample one token per row and record it; returns the tokens."""
        rules = self.rules
        apply_rules(rules, logits, step, state["last"], state["penultimate"], state["last_ts"])
        tokens = _sample(logits, state["row_temperature"], sampled, generators)
        done = state["done"]
        logprobs = F.log_softmax(logits.float(), dim=-1)  # as whisper, for equal sums
        current = logprobs.gather(1, tokens[:, None])[:, 0]
        state["sum_logprobs"] += current * ~done
        tokens = torch.where(done, torch.full_like(tokens, rules.eot), tokens)
        step_index = state["row_step"]
        state["out_tokens"].scatter_(1, step_index.clamp(max=self.sample_len - 1)[:, None], tokens[:, None])
        ended = (tokens == rules.eot) & ~done
        state["n_sampled"] = torch.where(ended, step_index, state["n_sampled"])
        state["row_step"] = step_index + (~done).long()
        state["done"] = done | (tokens == rules.eot) | (state["row_step"] >= state["n_steps"])
        state["penultimate"], state["last"] = state["last"], tokens
        state["last_ts"] = torch.where(tokens >= rules.timestamp_begin, tokens, state["last_ts"])
        return tokens

    def _merge(self, new: dict, cache: _Cache, width: int) -> None:
        """Join rows whose caches hold `width` columns into the batch, left-padding whichever
        side is shorter so every row writes its next token at the same column, and dropping
        leading columns no row uses any more."""
        if not self.tags:
            self.cache, self.column = cache, width
            self.state = new
        else:
            # everything is computed before anything is assigned: a failure (out of
            # memory) leaves the batch as it was
            column = max(self.column, width)
            merged_cache = _Cache.cat(self.cache.columns(0, self.column, pad_left=column - self.column),
                                      cache.columns(0, width, pad_left=column - width))
            masks = {"key_mask": torch.cat([F.pad(self.state["key_mask"][:, : self.column], (column - self.column, 0)),
                                            F.pad(new["key_mask"], (column - width, 0))])}
            merged = {k: masks[k] if k in masks else torch.cat([self.state[k], new[k]]) for k in _ROW_STATE}
            self.cache, self.state, self.column = merged_cache, merged, column
        self._trim()
        self.horizon = int((self.state["n_steps"] - self.state["row_step"]).max())
        self.cache.grow(self.column + self.horizon)

    def _trim(self) -> None:
        """Drop the leading cache columns that are padding for every row."""
        used = self.state["key_mask"][:, : self.column].any(dim=0)
        first = int(used.float().argmax()) if bool(used.any()) else self.column
        if first > 0:
            self.cache = self.cache.columns(first, self.cache.self_k[0].shape[1])
            self.state["key_mask"] = self.state["key_mask"][:, first:]
            self.column -= first

    @torch.no_grad()
    def step(self, max_tokens: int) -> List[Tuple[Any, DecodedWindow]]:
        """Decode up to `max_tokens` tokens for every row (fewer if all rows end first) and
        return the rows that have ended, which leave the batch."""
        state = self.state
        sampled, generators = self._sampled_rows(self.temperatures, self.generators, state["done"].device)
        for _ in range(min(max_tokens, self.horizon)):
            self.horizon -= 1
            column = self.column
            state["key_mask"] = F.pad(state["key_mask"][:, :column], (0, 1), value=True)
            hidden = _decoder_forward(
                self.model, state["next_tokens"][:, None], state["next_position"][:, None], self.cache,
                column, mask=state["key_mask"][:, None, None, :], is_causal=False,
            )
            state["next_position"] = state["next_position"] + 1
            self.column += 1
            logits = _logits(self.model, hidden[:, -1:])[:, 0]
            state["next_tokens"] = self._sample_step(state, logits, 1, sampled, generators)
        return self._retire()

    def _retire(self) -> List[Tuple[Any, DecodedWindow]]:
        state = self.state
        done = state["done"].tolist()  # the one host sync per chunk
        if not any(done):
            return []
        out_tokens = state["out_tokens"].cpu()
        n_sampled, sums = state["n_sampled"].tolist(), state["sum_logprobs"].tolist()
        no_speech = state["no_speech"].tolist()
        finished = []
        for r in (r for r, d in enumerate(done) if d):
            tokens = out_tokens[r, : n_sampled[r]].tolist()
            text = self.tokenizer.decode(tokens).strip()
            finished.append((self.tags[r], DecodedWindow(
                tokens=tokens, text=text, sum_logprob=sums[r], avg_logprob=sums[r] / (len(tokens) + 1),
                no_speech_prob=no_speech[r], temperature=self.temperatures[r],
                compression_ratio=compression_ratio(text),
            )))
        keep = [r for r, d in enumerate(done) if not d]
        self.tags = [self.tags[r] for r in keep]
        self.temperatures = [self.temperatures[r] for r in keep]
        self.generators = [self.generators[r] for r in keep]
        if keep:
            index = torch.tensor(keep, device=state["done"].device)
            self.state = {k: state[k].index_select(0, index) for k in _ROW_STATE}
            self.cache.keep(index)
            self._trim()
        else:
            self.state, self.cache, self.column, self.horizon = {}, None, 0, 0
        return finished


@torch.no_grad()
def decode_windows(
    model,
    audio_features: Tensor,
    initial_tokens: Sequence[Sequence[int]],
    tokenizer: Tokenizer,
    rules: TokenRules,
    temperatures: Union[float, Sequence[float]] = 0.0,
    max_new_tokens: Optional[int] = None,
    generators: Optional[Sequence[Optional[torch.Generator]]] = None,
    tokens_per_step: int = 16,
) -> List[DecodedWindow]:
    """Decode each row of `audio_features` (n_rows, n_audio_ctx, n_state) after its own
    `initial_tokens` to its end, all rows in one DecodeBatch; results in row order."""
    n_rows = audio_features.shape[0]
    if isinstance(temperatures, (int, float)):
        temperatures = [float(temperatures)] * n_rows
    batch = DecodeBatch(model, tokenizer, rules, max_new_tokens)
    batch.add(audio_features, initial_tokens, temperatures, generators or [None] * n_rows, range(n_rows))
    results: List[Optional[DecodedWindow]] = [None] * n_rows
    while len(batch):
        for row, result in batch.step(tokens_per_step):
            results[row] = result
    return results
