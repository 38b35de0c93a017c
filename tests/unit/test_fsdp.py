"""FSDP (pipelines.train.shard_per_layer) wraps each decoder layer as its own unit, and one training step under it
equals DDP's (the same step on one process over the whole batch, gradients averaged over the two workers' losses).
Two CPU processes with gloo on the tiny model."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(5, 100, (2, 10), generator=g)
    labels = ids.clone()
    labels[:, : 4 + rank] = -100
    return ids, labels


def _step(model, ids, labels, rank):
    out = model(input_ids=ids, labels=labels, budget=[1.0, 0.625][rank], generator=torch.Generator().manual_seed(rank))
    return out.loss


def _worker(rank, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.fsdp import FSDPModule

        from adallava.presets import build_tiny
        from pipelines.train import shard_per_layer

        model, _ = build_tiny("head", seed=0)
        model.train()
        model = shard_per_layer(model, torch.device("cpu"))
        layers = model.model.language_model.layers
        units = [isinstance(layer, FSDPModule) for layer in layers]
        local = [p.to_local().numel() for p in layers[0].parameters()]
        full = [p.numel() for p in layers[0].parameters()]
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        loss = _step(model, *_batch(rank), rank)
        loss.backward()
        opt.step()
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save({"units": units, "local": local, "full": full, "state": state, "loss": float(loss)},
                       os.path.join(result_dir, "fsdp.pt"))  # fmt: skip
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_wraps_each_decoder_layer_and_one_step_equals_ddp(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    got = torch.load(tmp_path / "fsdp.pt")
    assert got["units"] == [True] * 8  # every decoder layer is its own FSDP unit
    assert sum(got["local"]) * 2 == sum(got["full"])  # and holds half of its parameters on each worker

    from adallava.presets import build_tiny

    ref, _ = build_tiny("head", seed=0)
    ref.train()
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.5)
    losses = [_step(ref, *_batch(rank), rank) for rank in (0, 1)]
    (sum(losses) / 2).backward()  # DDP: the gradient averaged over workers
    opt.step()
    assert abs(float(losses[0].detach()) - got["loss"]) < 1e-5
    expected = ref.state_dict()
    initial = build_tiny("head", seed=0)[0].state_dict()
    assert set(got["state"]) == set(expected)
    changed = 0
    for key, value in expected.items():
        torch.testing.assert_close(got["state"][key], value, atol=1e-5, rtol=1e-4, msg=key)
        changed += int(not torch.equal(value, initial[key]))
    assert changed > 50  # the step moved the decoder layers, scheduler and latency encoder
