"""No host sync per decoder layer in prefill or training: the operations that make the host wait for the device
(.item(), .tolist(), bool(), nonzero, unique, .cpu(), a tensor-valued repeat_interleave, ...) are counted; their number
must not grow with the number of layers. Skip mode groups rows on one CPU copy of the plan (tensors derived from a
.cpu() copy are host tensors: not counted)."""

import torch
from torch.overrides import TorchFunctionMode

from adallava.presets import build_tiny

_SYNCING = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique", "cpu", "numpy",
            "unique_consecutive", "masked_select", "argwhere"}  # fmt: skip


class _Host(torch.Tensor):
    """Marks tensors that live on the host by design (the plan's CPU copy and what is computed from it)."""


class _CountSyncs(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        first = args[0] if args else None
        host = isinstance(first, _Host)
        if not host and name in _SYNCING:
            self.calls.append(name)
        if name == "repeat_interleave" and len(args) > 1 and isinstance(args[1], torch.Tensor):
            self.calls.append(name)
        out = func(*args, **kwargs)
        if name == "cpu" and isinstance(out, torch.Tensor) and not host:
            out = out.as_subclass(_Host)  # a device -> host copy: its own count above, then free to use
        return out


def _count(num_layers, granularity, mode, training):
    model, _ = build_tiny(granularity, num_hidden_layers=num_layers, num_prefix_layers=2)
    model.train(training)
    ids = torch.randint(5, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    cfg = model.config
    S, H = cfg.num_schedulable_layers, cfg.num_switches
    plan = torch.ones(3, S, 2, H)
    plan[0, :, 0, 1:] = 0  # partly used layers (head), a skipped row, a full row
    plan[1] = 0
    labels = ids.clone()
    with _CountSyncs() as counter:
        if training:
            model(input_ids=ids, labels=labels, budget=1.0, execution_plan=plan).loss.backward()
        else:
            with torch.no_grad():
                model(input_ids=ids, budget=1.0, execution_plan=plan, plan_mode=mode)
    return counter.calls


def test_training_forward_backward_syncs_do_not_grow_with_layers():
    for granularity in ("layer", "head"):
        assert _count(4, granularity, "mask", True) == _count(8, granularity, "mask", True)


def test_skip_mode_prefill_syncs_do_not_grow_with_layers():
    short, long = _count(4, "head", "skip", False), _count(8, "head", "skip", False)
    assert short == long
    assert short.count("cpu") == 1  # one copy of the plan per request


def test_generate_synchronises_cuda_before_each_timer_read(monkeypatch):
    """prefill_s / decode_s are read only after the device has finished (CUDA runs asynchronously)."""
    from adallava import modeling

    events = []
    monkeypatch.setattr(modeling, "_sync", lambda device: events.append("sync"))
    real_clock = modeling.time.perf_counter
    monkeypatch.setattr(modeling.time, "perf_counter", lambda: events.append("clock") or real_clock())
    model, _ = build_tiny("layer")
    ids = torch.randint(5, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, budget=[1.0, 0.75], max_new_tokens=3, return_dict_in_generate=True)
    clocks = [i for i, e in enumerate(events) if e == "clock"]
    assert len(clocks) == 3 and all(events[i - 1] == "sync" for i in clocks)
    assert out.timings["prefill_s"] > 0


def test_sync_calls_cuda_synchronize_only_for_cuda(monkeypatch):
    from adallava import modeling

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    modeling._sync(torch.device("cpu"))
    modeling._sync(torch.device("cuda", 0))
    assert calls == [torch.device("cuda", 0)]
