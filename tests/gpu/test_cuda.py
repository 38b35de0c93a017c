"""The CUDA paths (run where a GPU is; tests/conftest.py skips the `gpu` marker elsewhere): the same equalities as the
unit tier, in half precision on the device, and a cost table profiled there."""

import sys
from pathlib import Path

import pytest
import torch

from adallava import cost
from adallava.presets import build_tiny

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))  # the unit tier's input builders
from test_modeling import QUESTIONS, batch, images, prompt  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", params=["layer", "head"])
def tiny_cuda(request):
    model, processor = build_tiny(request.param, "mistral")
    return model.to("cuda", torch.float16), processor


def on_cuda(inputs):
    return {k: v.to("cuda") for k, v in inputs.items()}


def test_masked_equals_skipped_on_cuda(tiny_cuda):
    model, processor = tiny_cuda
    inputs = on_cuda(batch(processor))
    with torch.no_grad():
        masked = model(**inputs, budget=[0.6, 0.8, 1.0], plan_mode="mask")
        skipped = model(**inputs, budget=[0.6, 0.8, 1.0], plan_mode="skip")
    torch.testing.assert_close(masked.logits, skipped.logits, rtol=2e-2, atol=2e-2)


def test_mixed_budget_batch_matches_one_by_one_on_cuda(tiny_cuda):
    model, processor = tiny_cuda
    budgets = [0.6, 0.8, 1.0]
    together = model.generate(**on_cuda(batch(processor)), budget=budgets, max_new_tokens=6,
                              return_dict_in_generate=True)  # fmt: skip
    for i in range(3):
        alone = model.generate(**on_cuda(processor(images=images(3)[i], text=prompt(processor, QUESTIONS[i]),
                                                   return_tensors="pt")),
                               budget=budgets[i], max_new_tokens=6, return_dict_in_generate=True)  # fmt: skip
        assert torch.equal(alone.plan[0], together.plan[i])
        assert alone.flops[0] == together.flops[i]


def test_profile_on_cuda_names_the_device(tiny_cuda):
    model, _ = tiny_cuda
    table = cost.profile_latency(model, seq_lens=(16, 64), repeats=2)
    assert table["device"] == torch.cuda.get_device_name(model.device) and table["dtype"] == "float16"
