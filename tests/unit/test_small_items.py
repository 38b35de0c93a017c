"""The smaller faithfulness items (float32 budgets on every grid step: test_budget.py): the adaptive loss as a per-token mean, the
official head group for 40-head models, and cost.py free of modeling.py."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from adallava import budget
from adallava.config import AdaLlavaConfig
from adallava.objective import LossWeights, adaptive_loss, sample_budgets
from adallava.presets import build_tiny


def test_head_group_for_40_heads_is_the_official_8():
    text = LlamaConfig(num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40, hidden_size=5120)
    cfg = AdaLlavaConfig(text_config=text, granularity="head")
    assert (cfg.group_size, cfg.units_per_layer) == (8, 5)  # 13B-H: T_u = 200, as scheduler_rank = 8
    assert budget.encoder_input(torch.tensor([1.0], dtype=torch.float64), cfg).item() == 100 / 101
    from adallava.config import default_group_size

    assert [default_group_size(h) for h in (8, 16, 32, 40, 64)] == [2, 4, 8, 8, 8]  # small models keep 4 units


def test_adaptive_loss_is_a_per_token_mean():
    """With the paper's weights, adaptive_loss's LM term equals forward's loss (a mean over all labelled tokens of the
    batch), also when samples have different numbers of answer tokens."""
    model, _ = build_tiny("layer")
    model.train()
    ids = torch.randint(5, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :10] = -100  # 2 answer tokens
    labels[1, :4] = -100  # 8
    labels[2, :7] = -100  # 5
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    weights = LossWeights()
    torch.manual_seed(1)
    loss, parts = adaptive_loss(model, batch, weights, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(1)
    b = sample_budgets(model.config, 3, weights, g)
    reference = model(**batch, budget=b, generator=g).loss
    torch.testing.assert_close(loss, reference)  # the mean of the three per-sample means (as before) differs here


def test_cost_does_not_import_modeling():
    tree = ast.parse((Path(__file__).parents[2] / "adallava" / "cost.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "modeling" not in imported and ".modeling" not in imported
    code = "import sys, adallava.cost; print('adallava.modeling' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
