"""`extproc size`: does a model fit its GPUs at the window and caps the gateway enforces?

The sizing step of the playbook. From a model's Hugging Face ``config.json`` (committed under
``mesh/models/``), a GPU's memory and the vLLM settings, it works out what vLLM's memory profiler
will find: the weights per GPU, the KV cache left after them, how many tokens and sequences that
holds, and whether the deployment passes the checks in `problems`:

* the weights fit in ``gpu_memory_utilization x memory``;
* at least one full window (``--max-model-len``) fits in the KV cache (vLLM refuses to start otherwise);
* the window is within the model's positions;
* ``--max-num-seqs`` sequences at the gateway's caps (prompt cap + completion cap) fit in the KV cache,
  so the largest requests the gateway admits can all run at once without vLLM preempting any.

Every figure is an estimate from the architecture, not a measurement: parameter counts land within
a few percent of the published ones (Llama-3.1-8B 8.03e9, Qwen2.5-7B 7.6e9, Qwen2.5-72B 72.7e9,
bge-m3 568e6; the tests hold them to 3%), and the runtime reserve is a fixed allowance
(`RUNTIME_RESERVE_BYTES`), so a plan that passes with a thin margin deserves a look at vLLM's own
"KV cache" log line once deployed. An FP8 KV cache (``--kv-cache-dtype fp8``) is not modelled: the
plan assumes the KV cache at the served dtype, which only errs on the safe side.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from extproc.policy import Policy

MiB = 1 << 20
GiB = 1 << 30

# What vLLM needs per GPU besides weights and KV cache, inside the utilization budget: the peak
# activations of its profiling forward pass (max_num_batched_tokens through the widest MLP, plus the
# sampler's logits), CUDA graphs captured for decode batch sizes, and non-torch allocations (NCCL
# buffers, cuBLAS workspaces). vLLM logs these as roughly 1-1.5 GiB for 7-8B models and under 2 GiB
# per GPU for 70B-class models at TP 4; 2 GiB covers both with some room, and errs towards fewer
# KV tokens rather than more. The CUDA context itself sits in the (1 - utilization) share.
RUNTIME_RESERVE_BYTES = 2 * GiB

# vLLM allocates the KV cache in blocks of this many tokens (its default --block-size on GPUs);
# a sequence holds whole blocks, so capacity is counted in blocks.
KV_BLOCK_TOKENS = 16

DEFAULT_GPU_MEMORY_UTILIZATION = 0.9

# `nvidia.com/gpu.product` node-label values (GPU feature discovery) to the memory the driver
# reports, which GFD publishes as `nvidia.com/gpu.memory` in MiB: what vLLM's utilization applies to.
GPU_MEMORY: dict[str, int] = {
    "NVIDIA-A100-SXM4-80GB": 81920 * MiB,
    "NVIDIA-A100-SXM4-40GB": 40960 * MiB,
    "NVIDIA-H100-80GB-HBM3": 81559 * MiB,
    "NVIDIA-L40S": 46068 * MiB,
    "NVIDIA-A10G": 23028 * MiB,
    "NVIDIA-L4": 23034 * MiB,
}

ModelKind = Literal["decoder", "encoder"]

# Encoder-only families (BERT layout: absolute positions, 2-matrix MLP, no KV cache when serving).
_ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta"})
# RoBERTa-style position ids start after the padding index, so the table holds fewer tokens than rows.
_PADDING_OFFSET_TYPES = frozenset({"roberta", "xlm-roberta"})
# RoPE scalings vLLM multiplies the derived window by; llama3/longrope configs already state the
# scaled length in max_position_embeddings.
_WINDOW_SCALING_ROPE_TYPES = frozenset({"yarn", "linear", "dynamic"})

_DTYPE_BYTES: dict[str, int] = {
    "bfloat16": 2,
    "float16": 2,
    "half": 2,
    "float32": 4,
    "float": 4,
}


class SizingInputError(ValueError):
    """Input the sizing cannot use: an unreadable config, an unknown dtype, a malformed size."""


class _HFConfig(BaseModel):
    """The fields of a Hugging Face config.json the sizing reads; the rest are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    architectures: list[str] = Field(default_factory=list)
    model_type: str
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int | None = Field(default=None, gt=0)
    head_dim: int | None = Field(default=None, gt=0)
    vocab_size: int = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)
    # Newer transformers write `dtype`; float32 is transformers' default when a config names none.
    torch_dtype: str = Field(default="float32", validation_alias=AliasChoices("torch_dtype", "dtype"))
    tie_word_embeddings: bool = False
    attention_bias: bool | None = None
    mlp_bias: bool = False
    type_vocab_size: int = Field(default=2, ge=0)
    pad_token_id: int | None = None
    rope_scaling: dict[str, Any] | None = None
    quantization_config: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What the sizing needs of one model, derived from its config.json."""

    name: str
    architecture: str
    model_type: str
    kind: ModelKind
    layers: int
    hidden_size: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    usable_positions: int  # the longest window vLLM will accept for this model
    checkpoint_dtype: str
    dtype: str  # as served
    dtype_bytes: int
    fp8_weights: bool
    parameters: int  # estimated from the architecture
    linear_parameters: int  # the decoder-layer matrices an FP8 checkpoint stores in 1 byte

    @property
    def linear_weight_bytes(self) -> int:
        return 1 if self.fp8_weights else self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        rest = self.parameters - self.linear_parameters
        return self.linear_parameters * self.linear_weight_bytes + rest * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """Key and value vectors of every layer for one token, all KV heads: 0 for an encoder."""
        if self.kind == "encoder":
            return 0
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


def _served_dtype(checkpoint_dtype: str, requested: str) -> str:
    requested = requested.lower()
    if requested == "auto":
        # vLLM's "auto" keeps a half-precision checkpoint's dtype and serves a float32 one at half precision.
        return "float16" if _DTYPE_BYTES.get(checkpoint_dtype) == 4 else checkpoint_dtype
    if requested not in _DTYPE_BYTES:
        raise SizingInputError(f"dtype {requested!r} is not one of auto, {', '.join(_DTYPE_BYTES)}")
    return requested


def _is_fp8(quantization: dict[str, Any] | None) -> bool:
    if not quantization:
        return False
    method = str(quantization.get("quant_method", "")).lower()
    if method in ("fp8", "fbgemm_fp8"):
        return True
    if method == "compressed-tensors":
        groups = quantization.get("config_groups") or {}
        return any(
            isinstance(group, dict)
            and isinstance(group.get("weights"), dict)
            and group["weights"].get("type") == "float"
            and group["weights"].get("num_bits") == 8
            for group in groups.values()
        )
    return False


def _usable_positions(config: _HFConfig) -> int:
    if config.model_type in _PADDING_OFFSET_TYPES:
        pad = config.pad_token_id if config.pad_token_id is not None else 1
        return config.max_position_embeddings - pad - 1
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in _WINDOW_SCALING_ROPE_TYPES and "factor" in scaling:
        base = int(scaling.get("original_max_position_embeddings", config.max_position_embeddings))
        return int(base * float(scaling["factor"]))
    return config.max_position_embeddings


def _decoder_parameters(config: _HFConfig, kv_heads: int, head_dim: int) -> tuple[int, int]:
    """(all parameters, linear-layer parameters) of a Llama-style decoder: GQA attention, gated MLP."""
    h, heads = config.hidden_size, config.num_attention_heads
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    attention = h * q_width + 2 * h * kv_width + q_width * h
    mlp = 3 * h * config.intermediate_size
    # Qwen2 puts biases on q, k and v without saying so in its config; Llama says attention_bias.
    attention_bias = config.attention_bias if config.attention_bias is not None else config.model_type == "qwen2"
    attention_biases = q_width + 2 * kv_width if attention_bias else 0
    mlp_biases = 2 * config.intermediate_size + h if config.mlp_bias else 0
    biases = attention_biases + mlp_biases
    norms = 2 * h
    linear = config.num_hidden_layers * (attention + mlp)
    embeddings = config.vocab_size * h
    lm_head = 0 if config.tie_word_embeddings else config.vocab_size * h
    total = embeddings + linear + config.num_hidden_layers * (biases + norms) + h + lm_head
    return total, linear


def _encoder_parameters(config: _HFConfig) -> tuple[int, int]:
    """(all parameters, linear-layer parameters) of a BERT-layout encoder, pooler included."""
    h, i = config.hidden_size, config.intermediate_size
    embeddings = (config.vocab_size + config.max_position_embeddings + config.type_vocab_size) * h + 2 * h
    attention = 4 * (h * h + h) + 2 * h
    mlp = (h * i + i) + (i * h + h) + 2 * h
    # A bare *Model checkpoint (bge-m3's XLMRobertaModel) ships the pooler; task heads replace it.
    pooler = h * h + h if any(arch.endswith("Model") for arch in config.architectures) else 0
    linear = config.num_hidden_layers * (4 * h * h + 2 * h * i)
    return embeddings + config.num_hidden_layers * (attention + mlp) + pooler, linear


def parse_model_config(raw: Any, name: str, dtype: str = "auto") -> ModelSpec:
    """A config.json document as a `ModelSpec`; `dtype` is vLLM's --dtype (``auto`` as it defaults)."""
    if not isinstance(raw, dict):
        raise SizingInputError(f"{name}: a config.json must be a JSON object")
    try:
        config = _HFConfig.model_validate(raw)
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in exc.errors())
        raise SizingInputError(f"{name}: not a usable model config: {details}") from None
    checkpoint_dtype = config.torch_dtype.lower()
    if checkpoint_dtype not in _DTYPE_BYTES:
        raise SizingInputError(f"{name}: torch_dtype {config.torch_dtype!r} is not one of {', '.join(_DTYPE_BYTES)}")
    served = _served_dtype(checkpoint_dtype, dtype)
    kind: ModelKind = "encoder" if config.model_type in _ENCODER_TYPES else "decoder"
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
    if kind == "encoder":
        parameters, linear = _encoder_parameters(config)
    else:
        parameters, linear = _decoder_parameters(config, kv_heads, head_dim)
    return ModelSpec(
        name=name,
        architecture=config.architectures[0] if config.architectures else config.model_type,
        model_type=config.model_type,
        kind=kind,
        layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        attention_heads=config.num_attention_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        usable_positions=_usable_positions(config),
        checkpoint_dtype=checkpoint_dtype,
        dtype=served,
        dtype_bytes=_DTYPE_BYTES[served],
        # vLLM keeps embeddings, norms and lm_head at the served dtype; only decoder-layer matrices go FP8.
        fp8_weights=_is_fp8(config.quantization_config),
        parameters=parameters,
        linear_parameters=linear,
    )


def load_model_spec(path: str | Path, dtype: str = "auto") -> ModelSpec:
    """Read a config.json (or a directory holding one); the model is named after its directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise SizingInputError(f"{path}: cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise SizingInputError(f"{path}: not valid JSON: {exc}") from None
    return parse_model_config(raw, path.parent.name or str(path), dtype)


_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNIT_PREFIXES = "kmgt"  # Ki/K, Mi/M, ...: binary with an i, decimal (as disks and Kubernetes count) without


def parse_memory(value: str | int) -> int:
    """Bytes from ``80GiB``, ``80Gi``, ``81920MiB``, ``80GB`` (SI: 80e9), a plain byte count or a GPU product label."""
    if isinstance(value, bool):
        raise SizingInputError(f"memory size {value!r} is not a size")
    if isinstance(value, int):
        if value <= 0:
            raise SizingInputError(f"memory size {value} must be positive")
        return value
    if value.strip() in GPU_MEMORY:
        return GPU_MEMORY[value.strip()]
    match = _MEMORY.match(value)
    if not match:
        raise SizingInputError(
            f"memory size {value!r}: expected a number with a unit (80GiB, 81920MiB, 80GB), "
            f"a byte count, or one of {', '.join(GPU_MEMORY)}"
        )
    number, unit = float(match.group(1)), (match.group(2) or "").lower().removesuffix("b")
    if not unit:
        scale = 1
    elif unit.endswith("i"):
        scale = 1024 ** (_UNIT_PREFIXES.index(unit[0]) + 1)
    else:
        scale = 1000 ** (_UNIT_PREFIXES.index(unit) + 1)
    size = int(number * scale)
    if size <= 0:
        raise SizingInputError(f"memory size {value!r} must be positive")
    return size


@dataclass(frozen=True, slots=True)
class SizingReport:
    """One model on one vLLM instance (``tensor_parallel`` GPUs): figures are per GPU unless named otherwise."""

    spec: ModelSpec
    gpu_memory_bytes: int
    gpu_memory_utilization: float
    tensor_parallel: int
    budget_bytes: int  # utilization x memory: what vLLM lets itself use
    weight_bytes_per_gpu: int
    reserve_bytes: int
    headroom_bytes: int  # budget - weights - reserve; negative when the weights do not fit
    window: int  # max_model_len
    prompt_cap: int | None
    completion_cap: int | None
    max_num_seqs: int | None
    # The KV-cache figures; None for an encoder, which keeps no KV cache.
    kv_bytes_per_token: int | None  # per GPU: vLLM shards KV heads across the TP group
    kv_cache_bytes: int | None
    kv_tokens: int | None  # per instance: every GPU holds its heads' share of the same tokens
    full_window_sequences: int | None
    sequence_tokens_at_caps: int | None  # the longest sequence the caps admit, within the window
    sequences_at_caps: int | None

    @property
    def kv_applies(self) -> bool:
        return self.spec.kind == "decoder"

    @property
    def weights_fit(self) -> bool:
        return self.headroom_bytes >= 0


def _kv_heads_per_gpu(kv_heads: int, tensor_parallel: int) -> int:
    # With fewer KV heads than GPUs vLLM replicates them: each GPU still holds one.
    return max(1, kv_heads // tensor_parallel)


def _blocks_for(tokens: int) -> int:
    return -(-tokens // KV_BLOCK_TOKENS)


def plan(
    spec: ModelSpec,
    gpu_memory_bytes: int,
    tensor_parallel: int = 1,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    max_model_len: int | None = None,
    max_num_seqs: int | None = None,
    prompt_cap: int | None = None,
    completion_cap: int | None = None,
) -> SizingReport:
    """Where the memory of one instance goes. A missing cap leaves the window as the limit it implies."""
    if gpu_memory_bytes <= 0:
        raise SizingInputError(f"GPU memory {gpu_memory_bytes} must be positive")
    if tensor_parallel < 1:
        raise SizingInputError(f"tensor parallel {tensor_parallel} must be at least 1")
    if not 0 < gpu_memory_utilization <= 1:
        raise SizingInputError(f"GPU memory utilization {gpu_memory_utilization} must be in (0, 1]")
    for label, number in (
        ("max_model_len", max_model_len),
        ("max_num_seqs", max_num_seqs),
        ("prompt cap", prompt_cap),
        ("completion cap", completion_cap),
    ):
        if number is not None and number < 1:
            raise SizingInputError(f"{label} {number} must be at least 1")
    budget = int(gpu_memory_bytes * gpu_memory_utilization)
    # Embeddings and lm_head are vocab-sharded and norms are tiny, so the weights split evenly.
    weights = -(-spec.weight_bytes // tensor_parallel)
    headroom = budget - weights - RUNTIME_RESERVE_BYTES
    window = max_model_len or spec.usable_positions
    kv_per_token = kv_cache = kv_tokens = full_windows = at_caps_tokens = at_caps = None
    if spec.kind == "decoder":
        heads_per_gpu = _kv_heads_per_gpu(spec.kv_heads, tensor_parallel)
        kv_per_token = 2 * spec.layers * heads_per_gpu * spec.head_dim * spec.dtype_bytes
        kv_cache = max(0, headroom)
        blocks = kv_cache // (kv_per_token * KV_BLOCK_TOKENS)
        kv_tokens = blocks * KV_BLOCK_TOKENS
        full_windows = blocks // _blocks_for(window)
        if prompt_cap is None or completion_cap is None:
            at_caps_tokens = window
        else:
            at_caps_tokens = min(window, prompt_cap + completion_cap)
        at_caps = blocks // _blocks_for(at_caps_tokens)
    return SizingReport(
        spec=spec,
        gpu_memory_bytes=gpu_memory_bytes,
        gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel=tensor_parallel,
        budget_bytes=budget,
        weight_bytes_per_gpu=weights,
        reserve_bytes=RUNTIME_RESERVE_BYTES,
        headroom_bytes=headroom,
        window=window,
        prompt_cap=prompt_cap,
        completion_cap=completion_cap,
        max_num_seqs=max_num_seqs,
        kv_bytes_per_token=kv_per_token,
        kv_cache_bytes=kv_cache,
        kv_tokens=kv_tokens,
        full_window_sequences=full_windows,
        sequence_tokens_at_caps=at_caps_tokens,
        sequences_at_caps=at_caps,
    )


def _gib(size: int) -> str:
    return f"{size / GiB:.2f} GiB"


def _smallest_working_tp(report: SizingReport) -> int | None:
    """The fewest GPUs (up to 8) past the report's that hold the weights and, for a decoder, one full window."""
    spec = report.spec
    for tp in (2, 4, 8):
        if tp <= report.tensor_parallel or spec.attention_heads % tp:
            continue
        trial = plan(
            spec,
            report.gpu_memory_bytes,
            tensor_parallel=tp,
            gpu_memory_utilization=report.gpu_memory_utilization,
            max_model_len=report.window,
        )
        if trial.weights_fit and (not trial.kv_applies or (trial.full_window_sequences or 0) >= 1):
            return tp
    return None


def _tp_hint(report: SizingReport) -> str:
    better = _smallest_working_tp(report)
    return f"; tensor parallel {better} holds the weights and a full window" if better else ""


def problems(report: SizingReport) -> list[str]:
    """What stops this deployment from starting, or from running the caps' worst case unpreempted."""
    spec, tp = report.spec, report.tensor_parallel
    found: list[str] = []
    if spec.attention_heads % tp:
        found.append(
            f"tensor parallel {tp} does not divide the {spec.attention_heads} attention heads: vLLM refuses to start"
        )
    if spec.kind == "decoder" and spec.kv_heads % tp and tp % spec.kv_heads:
        found.append(
            f"tensor parallel {tp} neither divides nor is a multiple of the {spec.kv_heads} KV heads: "
            "vLLM refuses to start"
        )
    if not report.weights_fit:
        found.append(
            f"the weights do not fit: {_gib(report.weight_bytes_per_gpu)} per GPU at tensor parallel {tp} plus the "
            f"{_gib(report.reserve_bytes)} runtime reserve exceed the {_gib(report.budget_bytes)} usable "
            f"({_gib(report.gpu_memory_bytes)} x {report.gpu_memory_utilization}){_tp_hint(report)}"
        )
    if report.window > spec.usable_positions:
        found.append(
            f"max_model_len {report.window:,} exceeds the {spec.usable_positions:,} positions the model has "
            f"(max_position_embeddings {spec.max_position_embeddings:,}): vLLM refuses to start"
        )
    if not report.kv_applies or not report.weights_fit:
        return found
    assert report.kv_tokens is not None and report.full_window_sequences is not None
    if report.full_window_sequences < 1:
        found.append(
            f"not one full window fits: max_model_len {report.window:,} needs {report.window:,} tokens of KV cache "
            f"but only {report.kv_tokens:,} fit ({_gib(report.kv_cache_bytes or 0)} per GPU): vLLM refuses to start; "
            f"lower max_model_len to {report.kv_tokens:,} or less{_tp_hint(report)}"
        )
    if (
        report.max_num_seqs is not None
        and report.sequences_at_caps is not None
        and report.max_num_seqs > report.sequences_at_caps
    ):
        found.append(
            f"max_num_seqs {report.max_num_seqs} exceeds the {report.sequences_at_caps} sequences of "
            f"{report.sequence_tokens_at_caps:,} tokens (the caps' worst case) the KV cache holds "
            f"({report.kv_tokens:,} tokens): a full batch of the largest admitted requests would be preempted; "
            f"set max_num_seqs to {report.sequences_at_caps} or less, or lower the caps"
        )
    return found


def format_report(report: SizingReport, found: Sequence[str]) -> str:
    spec = report.spec
    lines = [f"model         {spec.name} ({spec.architecture}, {spec.kind})"]
    weight_dtype = f"{spec.dtype}, FP8 linear layers" if spec.fp8_weights else spec.dtype
    scale, unit = (1e9, "billion") if spec.parameters >= 1e9 else (1e6, "million")
    lines.append(f"parameters    {spec.parameters / scale:.2f} {unit} (estimated from the architecture)")
    lines.append(
        f"GPU           {_gib(report.gpu_memory_bytes)} x {report.gpu_memory_utilization} = "
        f"{_gib(report.budget_bytes)} usable per GPU, tensor parallel {report.tensor_parallel}"
    )
    lines.append(f"weights       {_gib(report.weight_bytes_per_gpu)} per GPU ({weight_dtype})")
    lines.append(f"reserve       {_gib(report.reserve_bytes)} per GPU (activations, CUDA graphs, non-torch memory)")
    lines.append(f"headroom      {_gib(report.headroom_bytes)} per GPU")
    window_note = f"of {spec.usable_positions:,} positions"
    if not report.kv_applies:
        lines.append(f"window        {report.window:,} tokens ({window_note})")
        lines.append("KV cache      does not apply: an encoder keeps no KV cache")
    elif not report.weights_fit:
        lines.append(f"window        {report.window:,} tokens ({window_note})")
        lines.append(f"KV cache      {report.kv_bytes_per_token:,} bytes/token per GPU; none left after the weights")
    else:
        lines.append(
            f"KV cache      {report.kv_bytes_per_token:,} bytes/token per GPU; {_gib(report.kv_cache_bytes or 0)} "
            f"per GPU holds {report.kv_tokens:,} tokens"
        )
        lines.append(
            f"window        {report.window:,} tokens ({window_note}): "
            f"{report.full_window_sequences:,} full-window sequences fit"
        )
        if report.prompt_cap is not None and report.completion_cap is not None:
            caps = f"{report.prompt_cap:,} + {report.completion_cap:,}"
            lines.append(
                f"caps          {caps} -> {report.sequence_tokens_at_caps:,} tokens per sequence: "
                f"{report.sequences_at_caps:,} sequences fit"
            )
        else:
            lines.append("caps          none given: the window is the largest sequence")
        if report.max_num_seqs is None:
            lines.append(
                f"max_num_seqs  not given: {report.sequences_at_caps:,} or less keeps the worst case unpreempted"
            )
        else:
            verdict = "ok" if report.max_num_seqs <= (report.sequences_at_caps or 0) else "too many"
            lines.append(f"max_num_seqs  {report.max_num_seqs:,} vs {report.sequences_at_caps:,} that fit: {verdict}")
    if found:
        lines.append("problems:")
        lines.extend(f"  - {problem}" for problem in found)
    else:
        lines.append("problems      none")
    return "\n".join(lines)


def report_json(report: SizingReport, found: Sequence[str]) -> dict[str, Any]:
    document = asdict(report)
    document["spec"]["weight_bytes"] = report.spec.weight_bytes
    document["kv_applies"] = report.kv_applies
    document["problems"] = list(found)
    return document


@dataclass(frozen=True, slots=True)
class BackendLimits:
    """The longest window and the largest caps a policy lets through to one backend."""

    window: int
    prompt_cap: int
    completion_cap: int


def backend_limits(policy: Policy, backend: str) -> BackendLimits:
    """The worst case the gateway admits to `backend`, as the targets the gateway compiles say.

    A model whose own backend it is brings its window and caps; a backend that declares
    ``max_model_len`` takes other models' traffic (rules, fallbacks) at that window. The gateway-wide
    caps are the ceiling of both. The largest of each is what the backend must hold.
    """
    # compiled imports the tokenizers; only the policy path of the CLI pays for that.
    from extproc.compiled import target_for

    if backend not in policy.backends:
        raise SizingInputError(
            f"backend {backend!r} is not in the policy (known: {', '.join(sorted(policy.backends))})"
        )
    declared = policy.backends[backend]
    targets = [
        target_for(model, backend, declared, policy)
        for model in policy.models
        if model.backend == backend or declared.max_model_len is not None
    ]
    if not targets:
        raise SizingInputError(
            f"backend {backend!r} is no model's own backend and declares no max_model_len: "
            "the policy gives it no window (pass --max-model-len and the caps)"
        )
    return BackendLimits(
        window=max(target.max_model_len for target in targets),
        prompt_cap=max(target.prompt_cap for target in targets),
        completion_cap=max(target.completion_cap for target in targets),
    )


def _run_size(args: argparse.Namespace) -> int:
    from extproc.policy import PolicyError, load_policy

    try:
        if (args.policy is None) != (args.backend is None):
            raise SizingInputError("--policy and --backend go together")
        spec = load_model_spec(args.model_config, args.dtype)
        gpu_memory = parse_memory(args.gpu_memory)
        window, prompt_cap, completion_cap = args.max_model_len, args.prompt_cap, args.completion_cap
        if args.policy is not None:
            limits = backend_limits(load_policy(args.policy), args.backend)
            # Flags given on the command line win over the policy: they try out a change before making it.
            window = window or limits.window
            prompt_cap = prompt_cap or limits.prompt_cap
            completion_cap = completion_cap or limits.completion_cap
        report = plan(
            spec,
            gpu_memory,
            tensor_parallel=args.tensor_parallel,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=window,
            max_num_seqs=args.max_num_seqs,
            prompt_cap=prompt_cap,
            completion_cap=completion_cap,
        )
    except (SizingInputError, PolicyError) as exc:
        print(f"extproc size: {exc}", file=sys.stderr)
        return 2
    found = problems(report)
    if args.json:
        print(json.dumps(report_json(report, found), indent=2))
    else:
        print(format_report(report, found))
    return 1 if found else 0


def add_size_command(subparsers: argparse._SubParsersAction) -> None:
    """Add `size` to a CLI's subcommands; its `func` returns 0 (fits), 1 (problems found) or 2 (bad input)."""
    size = subparsers.add_parser(
        "size",
        help="check that a model fits its GPUs at the window and caps the gateway enforces",
        description=(
            "Estimate a vLLM instance's memory from the model's config.json: weights, KV cache, how many "
            "sequences fit at the window and at the gateway's caps. Exits 1 when the deployment has problems."
        ),
    )
    size.add_argument("--model-config", required=True, help="a Hugging Face config.json, or its directory")
    size.add_argument(
        "--gpu-memory",
        required=True,
        help=f"memory of one GPU: 80GiB, 81920MiB, 80GB (=80e9), bytes, or a product label ({', '.join(GPU_MEMORY)})",
    )
    size.add_argument("--tensor-parallel", type=int, default=1, metavar="N", help="GPUs per instance (default 1)")
    size.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=DEFAULT_GPU_MEMORY_UTILIZATION,
        metavar="F",
        help=f"vLLM's --gpu-memory-utilization (default {DEFAULT_GPU_MEMORY_UTILIZATION})",
    )
    size.add_argument("--dtype", default="auto", help="vLLM's --dtype (default auto, as vLLM)")
    size.add_argument("--max-model-len", type=int, metavar="L", help="the window (default: the model's positions)")
    size.add_argument("--max-num-seqs", type=int, metavar="N", help="vLLM's --max-num-seqs, checked against the caps")
    size.add_argument("--prompt-cap", type=int, metavar="N", help="the gateway's prompt-token cap")
    size.add_argument("--completion-cap", type=int, metavar="N", help="the gateway's completion-token cap")
    size.add_argument("--policy", help="take the window and the caps from this policy ...")
    size.add_argument("--backend", help="... for this backend (explicit flags still win)")
    size.add_argument("--json", action="store_true", help="print the report as JSON")
    size.set_defaults(func=_run_size)


_VLLM_VALUE_FLAGS = frozenset(
    {"--max-model-len", "--max-num-seqs", "--gpu-memory-utilization", "--tensor-parallel-size", "--dtype"}
)
_VLLM_FLAG_ALIASES = {"-tp": "--tensor-parallel-size"}
_TOKEN_COUNT = re.compile(r"^(\d+)([kKmM]?)$")
# vLLM's human-readable lengths: lower-case units are decimal, upper-case binary.
_TOKEN_COUNT_SCALE = {"": 1, "k": 1000, "K": 1024, "m": 1_000_000, "M": 1 << 20}


def _vllm_flags(args: Sequence[str]) -> dict[str, str]:
    flags: dict[str, str] = {}
    index = 0
    while index < len(args):
        token = args[index]
        index += 1
        if not token.startswith("-"):
            continue
        name, sep, value = token.partition("=")
        # vLLM's parser accepts --max_model_len for --max-model-len.
        name = _VLLM_FLAG_ALIASES.get(name, "--" + name.lstrip("-").replace("_", "-"))
        if name not in _VLLM_VALUE_FLAGS:
            continue
        if not sep:
            if index >= len(args):
                flags[name] = ""
                continue
            value = args[index]
            index += 1
        flags[name] = value
    return flags


def _token_count(value: str) -> int | None:
    match = _TOKEN_COUNT.match(value.strip())
    return int(match.group(1)) * _TOKEN_COUNT_SCALE[match.group(2)] if match else None


def check_vllm_args(
    args: list[str],
    model_config_dir: Path,
    gpu_memory_bytes: int,
    policy_window: int,
    prompt_cap: int,
    completion_cap: int,
) -> list[str]:
    """Problems with a vLLM command line (a Deployment's args) for this model, GPU and policy backend."""
    flags = _vllm_flags(args)
    found: list[str] = []

    def count(flag: str) -> int | None:
        if flag not in flags:
            return None
        number = _token_count(flags[flag])
        if number is None or number < 1:
            found.append(f"{flag} {flags[flag]!r} is not a positive whole number")
        return number if number else None

    max_model_len = count("--max-model-len")
    max_num_seqs = count("--max-num-seqs")
    tensor_parallel = count("--tensor-parallel-size") or 1
    utilization = DEFAULT_GPU_MEMORY_UTILIZATION
    if "--gpu-memory-utilization" in flags:
        try:
            utilization = float(flags["--gpu-memory-utilization"])
        except ValueError:
            found.append(f"--gpu-memory-utilization {flags['--gpu-memory-utilization']!r} is not a number")
        if not 0 < utilization <= 1:
            found.append(f"--gpu-memory-utilization {utilization} is not in (0, 1]")
            utilization = DEFAULT_GPU_MEMORY_UTILIZATION
    dtype = flags.get("--dtype")
    if max_model_len is None and "--max-model-len" not in flags:
        found.append(
            f"--max-model-len is not set: vLLM would take the model's own window; the policy's is {policy_window:,}"
        )
    elif max_model_len is not None and max_model_len != policy_window:
        found.append(f"--max-model-len {max_model_len:,} differs from the policy's window {policy_window:,}")
    if dtype is not None and dtype != "bfloat16":
        found.append(f"--dtype {dtype!r}: serve at bfloat16 (--dtype bfloat16), as the sizing assumes")
    try:
        spec = load_model_spec(model_config_dir, dtype if dtype in _DTYPE_BYTES else "auto")
    except SizingInputError as exc:
        return [*found, str(exc)]
    if spec.kind == "decoder" and "--max-num-seqs" not in flags:
        found.append(
            "--max-num-seqs is not set: vLLM's default depends on its version and the GPU, so the caps cannot "
            "be shown to rule out preemption"
        )
    report = plan(
        spec,
        gpu_memory_bytes,
        tensor_parallel=tensor_parallel,
        gpu_memory_utilization=utilization,
        max_model_len=max_model_len or policy_window,
        max_num_seqs=max_num_seqs,
        prompt_cap=prompt_cap,
        completion_cap=completion_cap,
    )
    return found + problems(report)
