"""DDP (gloo, two processes, as Ray Train wraps the model: find_unused_parameters, frozen vision tower): after a
backward pass of the adaptive loss on different data and budgets per rank, every rank holds the same gradients, and
they are the mean of the ranks' local gradients. A step whose gradients were never all-reduced fails here."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_grads(rank):
    """The model, the rank's batch and its gradient of the adaptive loss without DDP."""
    from adallava.objective import LossWeights, adaptive_loss
    from powered import build_powered
    from test_modeling import batch

    model, processor = build_powered("head", "mistral")
    model.model.vision_tower.requires_grad_(False)
    model.train()
    inputs = dict(batch(processor, n=2 + rank))  # rank 0: 2 samples, rank 1: 3 (different data)
    labels = inputs["input_ids"].clone()
    labels[:, :-3] = -100
    inputs["labels"] = labels
    weights = LossWeights(distill=0.5, latency=1.0)
    return model, inputs, weights, adaptive_loss


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, inputs, weights, adaptive_loss = _local_grads(rank)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        loss, _ = adaptive_loss(model, inputs, weights, generator=torch.Generator().manual_seed(100 + rank))
        loss.backward()
        local = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for n, p in
                 model.named_parameters() if p.requires_grad}  # fmt: skip
        model.zero_grad()
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)

        class Configured:  # what pipelines.train hands adaptive_loss: the wrapped model, answering .config
            config = model.config

            def __call__(self, *a, **kw):
                return ddp(*a, **kw)

        loss, _ = adaptive_loss(Configured(), inputs, weights, generator=torch.Generator().manual_seed(100 + rank))
        loss.backward()
        synced = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for n, p in
                  model.named_parameters() if p.requires_grad}  # fmt: skip
        torch.save({"names": names, "local": local, "synced": synced}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_are_the_same_on_every_rank_and_the_mean_of_local_ones(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    names = ranks[0]["names"]
    assert names == ranks[1]["names"] and any(n.startswith("scheduler.") for n in names)
    for n in names:
        torch.testing.assert_close(ranks[0]["synced"][n], ranks[1]["synced"][n], rtol=0, atol=0)
        mean = (ranks[0]["local"][n] + ranks[1]["local"][n]) / world
        torch.testing.assert_close(ranks[0]["synced"][n], mean, rtol=1e-4, atol=1e-6)
    # the ranks' own gradients really differ (different data, budgets and plans), so the equality above is the sync
    assert not torch.allclose(ranks[0]["local"]["lm_head.weight"], ranks[1]["local"]["lm_head.weight"])
    assert ranks[0]["synced"]["scheduler.mlp_head.weight"].abs().sum() > 0
