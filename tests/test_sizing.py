"""`extproc size` and the vLLM argument check the manifest tests use, on the committed model configs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from extproc.policy import example_policy_path
from extproc.sizing import (
    GPU_MEMORY,
    KV_BLOCK_TOKENS,
    RUNTIME_RESERVE_BYTES,
    GiB,
    MiB,
    SizingInputError,
    add_size_command,
    check_vllm_args,
    load_model_spec,
    parse_memory,
    parse_model_config,
    plan,
    problems,
)

MODELS = Path(__file__).resolve().parent.parent / "mesh" / "models"
LLAMA_8B = MODELS / "llama-3.1-8b-instruct"
LLAMA_8B_FP8 = MODELS / "llama-3.1-8b-instruct-fp8"
QWEN_7B = MODELS / "qwen2.5-7b-instruct"
QWEN_72B = MODELS / "qwen2.5-72b-instruct"
BGE_M3 = MODELS / "bge-m3"
H100 = 80 * GiB


@pytest.mark.parametrize(
    ("model", "published"),
    [(LLAMA_8B, 8.03e9), (LLAMA_8B_FP8, 8.03e9), (QWEN_7B, 7.6e9), (QWEN_72B, 72.7e9), (BGE_M3, 568e6)],
)
def test_parameter_estimate_is_within_3_percent_of_the_published_count(model: Path, published: float) -> None:
    assert load_model_spec(model).parameters == pytest.approx(published, rel=0.03)


@pytest.mark.parametrize(
    ("model", "kv_bytes"), [(LLAMA_8B, 131072), (LLAMA_8B_FP8, 131072), (QWEN_7B, 57344), (QWEN_72B, 327680)]
)
def test_kv_bytes_per_token(model: Path, kv_bytes: int) -> None:
    spec = load_model_spec(model)
    assert spec.kv_bytes_per_token == kv_bytes
    assert plan(spec, H100, tensor_parallel=4 if model == QWEN_72B else 1).kv_bytes_per_token == (
        kv_bytes // 4 if model == QWEN_72B else kv_bytes
    )


def test_kv_heads_are_replicated_when_fewer_than_the_gpus() -> None:
    spec = load_model_spec(QWEN_7B)  # 4 KV heads
    assert plan(spec, H100, tensor_parallel=4).kv_bytes_per_token == 57344 // 4
    # At TP 8 each GPU still keeps one head: the per-GPU cost stops shrinking.
    assert plan(spec, H100, tensor_parallel=8).kv_bytes_per_token == 57344 // 4


def test_spec_fields_come_from_the_config() -> None:
    llama = load_model_spec(LLAMA_8B)
    assert (llama.layers, llama.kv_heads, llama.head_dim, llama.dtype_bytes) == (32, 8, 128, 2)
    assert llama.usable_positions == 131072
    assert llama.kind == "decoder" and not llama.fp8_weights
    bge = load_model_spec(BGE_M3)
    assert bge.kind == "encoder" and bge.kv_bytes_per_token == 0
    assert bge.checkpoint_dtype == "float32" and bge.dtype_bytes == 2  # vLLM's auto halves an fp32 checkpoint
    assert bge.usable_positions == 8192  # XLM-R positions start after the padding index
    assert load_model_spec(BGE_M3, dtype="float32").dtype_bytes == 4


def test_kv_heads_default_to_attention_heads_and_head_dim_to_hidden_over_heads() -> None:
    raw = json.loads((LLAMA_8B / "config.json").read_text())
    del raw["num_key_value_heads"]
    spec = parse_model_config(raw, "mha")
    assert spec.kv_heads == 32 and spec.head_dim == 128
    raw["head_dim"] = 256
    assert parse_model_config(raw, "wide").head_dim == 256


def test_fp8_weights_take_one_byte_in_the_linear_layers() -> None:
    bf16, fp8 = load_model_spec(LLAMA_8B), load_model_spec(LLAMA_8B_FP8)
    assert fp8.fp8_weights
    assert bf16.weight_bytes == 2 * bf16.parameters
    # Embeddings and lm_head (~1.05e9 parameters) stay at 2 bytes: about 9.1 GB in all.
    assert fp8.weight_bytes == bf16.weight_bytes - fp8.linear_parameters
    assert fp8.weight_bytes == pytest.approx(9.08e9, rel=0.01)
    assert fp8.kv_bytes_per_token == bf16.kv_bytes_per_token  # the KV cache stays at the served dtype


def test_an_8b_on_80gib_holds_hundreds_of_thousands_of_tokens() -> None:
    report = plan(load_model_spec(LLAMA_8B), H100, max_model_len=8192, prompt_cap=6144, completion_cap=1024)
    assert report.weights_fit
    assert report.weight_bytes_per_gpu == pytest.approx(16.06e9, rel=0.01)
    assert report.budget_bytes == int(0.9 * H100)
    expected_kv = report.budget_bytes - report.weight_bytes_per_gpu - RUNTIME_RESERVE_BYTES
    assert report.kv_cache_bytes == expected_kv
    assert report.kv_tokens is not None and 300_000 < report.kv_tokens < 600_000
    assert report.kv_tokens % KV_BLOCK_TOKENS == 0
    assert report.full_window_sequences == report.kv_tokens // 8192
    assert report.sequence_tokens_at_caps == 7168
    assert report.sequences_at_caps == report.kv_tokens // 7168
    assert problems(report) == []


def test_a_72b_does_not_fit_one_gpu_but_fits_four() -> None:
    spec = load_model_spec(QWEN_72B)
    alone = plan(spec, H100, max_model_len=32768)
    assert not alone.weights_fit
    found = problems(alone)
    assert len(found) == 1 and "weights do not fit" in found[0]
    assert "135.43 GiB" in found[0] and "tensor parallel 4" in found[0]
    four = plan(spec, H100, tensor_parallel=4, max_model_len=32768, prompt_cap=32768, completion_cap=4096)
    assert four.weights_fit and four.weight_bytes_per_gpu == pytest.approx(spec.weight_bytes / 4, abs=1)
    assert four.full_window_sequences is not None and four.full_window_sequences >= 1
    assert four.sequence_tokens_at_caps == 32768  # the caps' sum is held to the window
    assert problems(four) == []


def test_tp_2_holds_72b_weights_but_not_a_full_window() -> None:
    report = plan(load_model_spec(QWEN_72B), H100, tensor_parallel=2, max_model_len=32768)
    assert report.weights_fit and report.full_window_sequences == 0
    (found,) = problems(report)
    assert "not one full window fits" in found and "vLLM refuses to start" in found


def test_max_num_seqs_above_what_the_caps_fit_is_reported() -> None:
    spec = load_model_spec(LLAMA_8B)
    fitting = plan(spec, H100, max_model_len=8192, prompt_cap=6144, completion_cap=1024)
    assert fitting.sequences_at_caps is not None
    at_limit = plan(
        spec, H100, max_model_len=8192, prompt_cap=6144, completion_cap=1024, max_num_seqs=fitting.sequences_at_caps
    )
    assert problems(at_limit) == []
    over = plan(
        spec, H100, max_model_len=8192, prompt_cap=6144, completion_cap=1024, max_num_seqs=fitting.sequences_at_caps + 1
    )
    (found,) = problems(over)
    assert f"max_num_seqs {fitting.sequences_at_caps + 1} exceeds the {fitting.sequences_at_caps} sequences" in found


def test_a_window_beyond_the_models_positions_is_reported() -> None:
    found = problems(plan(load_model_spec(QWEN_7B), H100, max_model_len=65536))
    assert any("exceeds the 32,768 positions" in problem for problem in found)


def test_tensor_parallel_must_divide_the_heads() -> None:
    found = problems(plan(load_model_spec(QWEN_7B), H100, tensor_parallel=3, max_model_len=8192))
    assert any("does not divide the 28 attention heads" in problem for problem in found)


def test_an_encoder_reports_weights_and_headroom_only() -> None:
    report = plan(load_model_spec(BGE_M3), GPU_MEMORY["NVIDIA-L4"], max_model_len=8192, max_num_seqs=1024)
    assert not report.kv_applies
    assert report.kv_tokens is None and report.sequences_at_caps is None
    assert report.weight_bytes_per_gpu == pytest.approx(1.14e9, rel=0.01)
    assert report.headroom_bytes > 0
    assert problems(report) == []


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("80GiB", 80 * GiB),
        ("80Gi", 80 * GiB),
        ("81920MiB", 80 * GiB),
        ("80GB", 80 * 10**9),
        ("80 gb", 80 * 10**9),
        ("1.5GiB", 3 * GiB // 2),
        ("1024", 1024),
        (85899345920, 80 * GiB),
        ("NVIDIA-H100-80GB-HBM3", 81559 * MiB),
    ],
)
def test_parse_memory(text: str | int, size: int) -> None:
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["", "80XB", "GiB", "-1GiB", "0", 0, -5])
def test_parse_memory_rejects_nonsense(text: str | int) -> None:
    with pytest.raises(SizingInputError):
        parse_memory(text)


def test_gpu_memory_table_names_node_label_values() -> None:
    assert GPU_MEMORY["NVIDIA-A100-SXM4-80GB"] == 80 * GiB
    assert GPU_MEMORY["NVIDIA-A100-SXM4-40GB"] == 40 * GiB
    assert {"NVIDIA-L40S", "NVIDIA-A10G", "NVIDIA-L4"} <= GPU_MEMORY.keys()
    assert GPU_MEMORY["NVIDIA-L4"] < GPU_MEMORY["NVIDIA-L40S"] < GPU_MEMORY["NVIDIA-H100-80GB-HBM3"]


def test_a_broken_config_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(SizingInputError, match="hidden_size"):
        load_model_spec(tmp_path)
    with pytest.raises(SizingInputError, match="cannot read"):
        load_model_spec(tmp_path / "missing")


# --- the CLI, through the same hook extproc.cli uses --------------------------------------


def _size(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="extproc")
    add_size_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["size", *argv])
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def _for_backend(model_config: str, gpu: str, backend: str) -> list[str]:
    """`size` arguments for a backend of the example policy (its window and caps)."""
    return [
        "--model-config",
        model_config,
        "--gpu-memory",
        gpu,
        "--policy",
        str(example_policy_path()),
        "--backend",
        backend,
    ]


def test_cli_sizes_a_policy_backend(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _size(capsys, *_for_backend(str(LLAMA_8B), "80GiB", "default-8b"))
    assert code == 0, out
    assert "window        8,192 tokens" in out
    assert "6,144 + 1,024 -> 7,168 tokens per sequence" in out
    assert "problems      none" in out


def test_cli_json_output_parses(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _size(
        capsys,
        "--model-config",
        str(QWEN_72B / "config.json"),
        "--gpu-memory",
        "80GiB",
        "--tensor-parallel",
        "4",
        "--policy",
        str(example_policy_path()),
        "--backend",
        "large-reasoning-model",
        "--json",
    )
    assert code == 0
    document = json.loads(out)
    assert document["window"] == 32768
    assert document["kv_bytes_per_token"] == 327680 // 4
    assert document["spec"]["name"] == "qwen2.5-72b-instruct"
    assert document["problems"] == []


def test_cli_exits_1_on_problems(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _size(capsys, "--model-config", str(QWEN_72B), "--gpu-memory", "80GiB", "--max-model-len", "32768")
    assert code == 1
    assert "weights do not fit" in out
    code, out, _ = _size(
        capsys, *_for_backend(str(LLAMA_8B), "NVIDIA-H100-80GB-HBM3", "default-8b"), "--max-num-seqs", "256", "--json"
    )
    assert code == 1
    (problem,) = json.loads(out)["problems"]
    assert "max_num_seqs 256" in problem


def test_cli_encoder(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _size(capsys, *_for_backend(str(BGE_M3), "NVIDIA-L4", "embeddings"))
    assert code == 0
    assert "KV cache      does not apply" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--model-config", "/nonexistent/config.json", "--gpu-memory", "80GiB"],
        ["--model-config", str(LLAMA_8B), "--gpu-memory", "lots"],
        ["--model-config", str(LLAMA_8B), "--gpu-memory", "80GiB", "--policy", str(example_policy_path())],
        ["--model-config", str(LLAMA_8B), "--gpu-memory", "80GiB", "--policy", "/nonexistent.yaml", "--backend", "x"],
        [
            "--model-config",
            str(LLAMA_8B),
            "--gpu-memory",
            "80GiB",
            "--policy",
            str(example_policy_path()),
            "--backend",
            "no-such-backend",
        ],
        ["--model-config", str(LLAMA_8B), "--gpu-memory", "80GiB", "--gpu-memory-utilization", "1.5"],
        ["--model-config", str(LLAMA_8B), "--gpu-memory", "80GiB", "--tensor-parallel", "0"],
    ],
)
def test_cli_exits_2_on_bad_input(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = _size(capsys, *argv)
    assert code == 2
    assert out == "" and err.startswith("extproc size: ")


def test_cli_flags_win_over_the_policy(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _size(
        capsys, *_for_backend(str(LLAMA_8B_FP8), "NVIDIA-L4", "fast-8b"), "--max-model-len", "2048", "--json"
    )
    assert code == 0
    document = json.loads(out)
    assert document["window"] == 2048
    # fast-8b declares no caps of its own: the gateway-wide ones apply, held to the window.
    assert (document["prompt_cap"], document["completion_cap"]) == (32768, 4096)
    assert document["sequence_tokens_at_caps"] == 2048


# --- vLLM command lines, as the manifest tests check them ------------------------------


def _check(args: list[str], model: Path = LLAMA_8B, gpu: int = H100, window: int = 8192) -> list[str]:
    return check_vllm_args(args, model, gpu, window, 6144, 1024)


def test_check_vllm_args_accepts_a_good_command_line() -> None:
    good = [
        "--model",
        "meta-llama/Llama-3.1-8B-Instruct",
        "--max-model-len",
        "8192",
        "--max-num-seqs",
        "48",
        "--gpu-memory-utilization=0.9",
        "--dtype",
        "bfloat16",
        "--enable-prefix-caching",
    ]
    assert _check(good) == []
    assert _check(["serve", "x", "--max-model-len=8192", "--max_num_seqs=48", "-tp", "1"]) == []


def test_check_vllm_args_uses_tensor_parallel() -> None:
    args = ["--max-model-len", "32768", "--max-num-seqs", "8", "--dtype=bfloat16"]
    one = check_vllm_args(args, QWEN_72B, H100, 32768, 32768, 4096)
    assert any("weights do not fit" in problem for problem in one)
    assert check_vllm_args([*args, "--tensor-parallel-size", "4"], QWEN_72B, H100, 32768, 32768, 4096) == []


def test_check_vllm_args_wants_the_policy_window() -> None:
    (missing,) = _check(["--max-num-seqs", "48"])
    assert "--max-model-len is not set" in missing and "8,192" in missing
    (different,) = _check(["--max-model-len", "16384", "--max-num-seqs", "32"])
    assert "--max-model-len 16,384 differs from the policy's window 8,192" in different


def test_check_vllm_args_flags_dtype_and_max_num_seqs() -> None:
    found = _check(["--max-model-len", "8192", "--max-num-seqs", "48", "--dtype", "float16"])
    assert len(found) == 1 and "--dtype 'float16'" in found[0]
    (unset,) = _check(["--max-model-len", "8192"])
    assert "--max-num-seqs is not set" in unset
    (too_many,) = _check(["--max-model-len", "8192", "--max-num-seqs", "256"])
    assert "max_num_seqs 256 exceeds" in too_many


def test_check_vllm_args_on_small_gpus_and_bad_values() -> None:
    # An L4 holds the FP8 8B with a short window, but not many sequences of it.
    l4 = GPU_MEMORY["NVIDIA-L4"]
    assert (
        check_vllm_args(["--max-model-len", "4096", "--max-num-seqs", "16"], LLAMA_8B_FP8, l4, 4096, 32768, 4096) == []
    )
    assert check_vllm_args(["--max-model-len", "4096", "--max-num-seqs", "64"], LLAMA_8B_FP8, l4, 4096, 32768, 4096)
    found = _check(["--max-model-len", "lots", "--max-num-seqs", "48", "--gpu-memory-utilization", "2"])
    assert any("--max-model-len 'lots'" in problem for problem in found)
    assert any("--gpu-memory-utilization 2.0 is not in (0, 1]" in problem for problem in found)


def test_check_vllm_args_for_an_encoder_needs_no_max_num_seqs() -> None:
    args = ["--max-model-len", "8192", "--dtype", "bfloat16"]
    assert check_vllm_args(args, BGE_M3, GPU_MEMORY["NVIDIA-L4"], 8192, 8192, 1) == []
    (too_long,) = check_vllm_args(["--max-model-len", "8194"], BGE_M3, GPU_MEMORY["NVIDIA-L4"], 8194, 8194, 1)
    assert "exceeds the 8,192 positions" in too_long
