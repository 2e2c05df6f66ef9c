"""The lm-eval adapter's choices of device and of the rank that writes results."""
from __future__ import annotations

import logging

import pytest
import torch

lm_eval_adapter = pytest.importorskip("megaevo.eval.lm_eval_adapter")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_on_a_cpu_machine_falls_back_to_the_cpu(device, caplog):
    with caplog.at_level(logging.WARNING, logger="megaevo"):
        assert lm_eval_adapter.available_device(device) == "cpu"
    assert "CUDA is not available" in caplog.text


@pytest.mark.parametrize("device", [None, "cpu"])
def test_other_devices_are_kept(device):
    assert lm_eval_adapter.available_device(device) == device


def test_only_rank_0_writes_results():
    argv = ["--model", "megaevo", "--model_args", "load=x", "--output_path", "out", "--log_samples",
            "--tasks", "hellaswag", "-o=elsewhere", "-s", "--wandb_args", "project=p", "--batch_size", "4"]
    assert lm_eval_adapter.rank0_argv(argv, 0) == argv
    assert lm_eval_adapter.rank0_argv(argv, 3) == ["--model", "megaevo", "--model_args", "load=x",
                                                   "--tasks", "hellaswag", "--batch_size", "4"]


def test_cli_on_a_cpu_machine_needs_no_device_flag(tmp_path, monkeypatch):
    """lm-eval's command line with the megaevo model and no --device, on a saved tiny model: the
    results are written (machines without CUDA used to fail here)."""
    transformers = pytest.importorskip("transformers")
    import json
    from pathlib import Path

    from test_convert_hf import write_tokenizer

    root = Path(__file__).resolve().parent.parent
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(root)  # the task's data_files path is relative to the repository root
    model_dir = tmp_path / "llama"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    write_tokenizer(model_dir, 300)
    out = tmp_path / "results"
    lm_eval_adapter.main(["--model", "megaevo", "--model_args", f"load={model_dir}", "--tasks", "megaevo_mc_tiny",
                          "--include_path", str(root / "tests" / "data" / "lmeval_task"), "--output_path", str(out),
                          "--batch_size", "4"])
    written = sorted(out.rglob("results*.json"))
    assert written, sorted(out.rglob("*"))
    assert "acc,none" in json.loads(written[0].read_text())["results"]["megaevo_mc_tiny"]
