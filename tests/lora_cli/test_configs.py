"""Every shipped config (examples/*.yaml|toml and the demo's) is a valid LoraSftConfig."""

from __future__ import annotations

from pathlib import Path

import pytest
from lora_cli.options import load_config_file
from lora_runtime.config import LoraSftConfig

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "packages/lora-cli/src/lora_cli/demo/demo.yaml"
SHIPPED = sorted((ROOT / "examples").glob("*.yaml")) + sorted((ROOT / "examples").glob("*.toml")) + [DEMO]


def test_there_are_examples():
    assert len(SHIPPED) >= 4, SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_is_valid(path, monkeypatch):
    monkeypatch.setattr("lora_runtime.preflight.cuda_available", lambda: True)  # qlora.yaml is for a GPU
    values = load_config_file(path)
    assert values, f"{path} is empty"
    cfg = LoraSftConfig(model_path="m", data_path="d", ckpt_output_dir="o", **values).validate()
    for key, value in values.items():
        assert getattr(cfg, key) == value, key


def test_demo_config_trains_on_the_cpu():
    cfg = LoraSftConfig("m", "d", "o", **load_config_file(DEMO))
    assert cfg.backend == "peft" and cfg.bf16 is False
