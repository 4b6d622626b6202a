"""benchmarks/gpu_inputs.py: the fine-tuned MiniLM and its SideNet written for the device run, the MainNet
cast to bfloat16 (to fit what a run carries), and loadable there as benchmarks/gpu.py loads them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from benchmarks.gpu_inputs import MAINNET, SIDENET, write_minilm

import sidenet
from helpers import tiny_bert

transformers = pytest.importorskip("transformers")


def saved_mainnet_and_sidenet(tmp_path: Path) -> tuple[Path, Path]:
    """A small BERT saved as the SST-2 benchmarks save their MainNet (with a tokenizer), and a SideNet on it."""
    from sidenet.text_pretrain import MINILM, load_tokenizer

    mainnet, folder = tiny_bert(vocab_size=30522, max_position_embeddings=64, num_labels=2), tmp_path / "mainnet"
    mainnet.save_pretrained(folder)
    load_tokenizer(MINILM).save_pretrained(folder)
    sidenet.save_sidenet(sidenet.attach(mainnet, 1, hidden=8, seed=0), tmp_path / "sidenet")
    return folder, tmp_path / "sidenet"


def test_the_mainnet_goes_in_bfloat16_and_loads_with_its_sidenet_without_the_fingerprint(tmp_path: Path) -> None:
    mainnet, side = saved_mainnet_and_sidenet(tmp_path)
    message = write_minilm(tmp_path / "out", mainnet, side)
    assert message.startswith("wrote") and "bfloat16" in message
    carried = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / MAINNET)
    assert {p.dtype for p in carried.parameters()} == {torch.bfloat16}
    assert (tmp_path / "out" / MAINNET / "tokenizer.json").is_file()
    # A cast MainNet is another MainNet to the fingerprint: gpu.py loads without that check.
    with pytest.raises(sidenet.MainNetMismatchError, match="cast"):
        sidenet.load_sidenet(carried, tmp_path / "out" / SIDENET)
    model = sidenet.load_sidenet(carried, tmp_path / "out" / SIDENET, check_fingerprint=False)
    assert model.split.tap == 1


def test_nothing_is_written_without_the_mainnet_or_the_sidenet(tmp_path: Path) -> None:
    mainnet, side = saved_mainnet_and_sidenet(tmp_path)
    assert "no fine-tuned MiniLM MainNet" in write_minilm(tmp_path / "out", tmp_path / "absent", side)
    assert "no SideNet" in write_minilm(tmp_path / "out", mainnet, tmp_path / "absent")
    assert not (tmp_path / "out").exists()


def test_the_gpu_benchmark_times_the_carried_mainnet_and_sidenet(tmp_path: Path) -> None:
    from benchmarks import gpu

    mainnet, side = saved_mainnet_and_sidenet(tmp_path)
    write_minilm(tmp_path / "out", mainnet, side)
    carried = ["--sst2-mainnet", str(tmp_path / "out" / MAINNET), "--sst2-sidenet", str(tmp_path / "out" / SIDENET)]
    chosen = ["--workloads", "minilm_sst2", "--dtypes", "bfloat16", "--out", str(tmp_path / "gpu.json")]
    result = gpu.run(gpu.options(["--quick", *carried, *chosen]))
    assert result["complete"] and {c["workload"] for c in result["cases"]} == {"minilm_sst2"}
    assert any(r["mode"] == "sidenet_compiled" for r in result["rows"])
