"""Continuous batching (adallava.engine): requests that join late, leave early or sit beside others of other budgets
get exactly what they get alone; a short request leaves after its own number of steps. Tiny random models."""

import numpy as np
import pytest
import torch
from PIL import Image

from adallava.budget import budget_grid
from adallava.engine import Engine, Request
from adallava.presets import build_tiny

ARCHS = [("layer", "llama"), ("head", "llama"), ("head", "qwen2")]
QUESTIONS = ["What colour is the circle?", "How many squares are there in the picture?", "Is it left?",
             "Describe the picture in a few words please."]  # fmt: skip


@pytest.fixture(scope="module", params=ARCHS, ids=lambda a: f"{a[0]}-{a[1]}")
def tiny(request):
    return build_tiny(*request.param)


def images(n, size=40):
    return [Image.fromarray((np.random.RandomState(i).rand(size, size, 3) * 255).astype("uint8")) for i in range(n)]


def prompt(processor, question, image=True):
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def make_request(processor, i, budget, max_new_tokens, image=True, **kw):
    if image:
        enc = processor(images=images(4)[i], text=prompt(processor, QUESTIONS[i]), return_tensors="pt")
    else:
        enc = processor(text=prompt(processor, QUESTIONS[i], image=False), return_tensors="pt")
    return Request(f"r{i}", enc["input_ids"], pixel_values=enc.get("pixel_values"), budget=budget,
                   max_new_tokens=max_new_tokens, keep_logits=True, **kw)  # fmt: skip


def run(engine, schedule):
    """schedule: {step number: [requests to add before it]}; runs until idle -> {id: Finished}, step of each event."""
    done, seen = {}, {}
    step = 0
    while engine.has_work or any(s >= step for s in schedule):
        for req in schedule.get(step, []):
            engine.add(req)
        for ev in engine.step():
            seen.setdefault(ev.request_id, []).append(step)
            if ev.finished is not None:
                done[ev.request_id] = ev.finished
        step += 1
        assert step < 200
    return done, seen


def alone(model, processor, i, budget, n, image=True):
    req = make_request(processor, i, budget, n, image)
    out = model.generate(req.input_ids, pixel_values=req.pixel_values, budget=budget, max_new_tokens=n,
                         eos_token_id=-1, return_dict_in_generate=True)  # fmt: skip
    done, _ = run(Engine(model, eos_token_id=-1), {0: [make_request(processor, i, budget, n, image)]})
    return out, done[f"r{i}"]


def test_joined_late_equals_alone(tiny):
    """Four requests, mixed budgets and lengths, one without an image, joining at steps 0, 0, 2 and 5 (after the
    shortest left): tokens equal generate() alone, logits equal the engine alone, plans and FLOPs equal."""
    model, processor = tiny
    grid = budget_grid(model.config)
    spec = [(grid[1], 9, True), (1.0, 3, True), (grid[len(grid) // 2 + 1], 7, False), (grid[2], 5, True)]
    schedule = {0: [], 2: [], 5: []}
    for i, (b, n, img) in enumerate(spec):
        schedule[[0, 0, 2, 5][i]].append(make_request(processor, i, b, n, img))
    engine = Engine(model, max_batch_size=4, eos_token_id=-1)
    done, _ = run(engine, schedule)
    assert not engine.pools  # every cache freed
    for i, (b, n, img) in enumerate(spec):
        ref, ref_engine = alone(model, processor, i, b, n, img)
        got = done[f"r{i}"]
        assert got.token_ids == ref.sequences[0, -n:].tolist() == ref_engine.token_ids
        assert torch.equal(got.plan, ref.plan[0])
        assert got.flops == float(ref.flops[0]) and got.finish_reason == "length"
        assert len(got.logits) == n
        for a, r in zip(got.logits, ref_engine.logits):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_a_short_request_leaves_after_its_own_steps(tiny):
    model, processor = tiny
    engine = Engine(model, max_batch_size=2, eos_token_id=-1)
    long, short, late = (make_request(processor, 0, 1.0, 12), make_request(processor, 1, 0.75, 2),
                         make_request(processor, 2, 0.5, 3))  # fmt: skip
    done, seen = run(engine, {0: [long, short, late]})
    # the short one is active at steps 0 and 1 and gone after; the third waits for its slot (max_batch_size 2) and
    # takes it in the step that freed it (decode first, then prefill)
    assert seen["r1"] == [0, 1] and done["r1"].finished_step == 1 and done["r1"].joined_step == 0
    assert seen["r2"] == [1, 2, 3] and done["r2"].joined_step == 1
    assert seen["r0"] == list(range(12))  # the long one never waited for anyone


def test_on_event_hands_each_token_on_before_the_steps_later_prefills(tiny):
    """step(on_event): a running row's token reaches the caller while the step's joiners still wait for their
    prefill, and each joiner's first token arrives right after its own prefill, before the next one's; the events are
    the ones step() returns, in the same order."""
    model, processor = tiny
    engine = Engine(model, max_batch_size=4, eos_token_id=-1)
    engine.add(make_request(processor, 0, 1.0, 3))
    engine.step()  # r0 runs
    for i in (1, 2, 3):
        engine.add(make_request(processor, i, 0.75, 2))
    seen = []  # (request id, requests still waiting for their prefill when its event came)
    returned = engine.step(on_event=lambda ev: seen.append((ev.request_id, engine.num_waiting, ev.token)))
    assert [(rid, waiting) for rid, waiting, _ in seen] == [("r0", 3), ("r1", 2), ("r2", 1), ("r3", 0)]
    assert [(ev.request_id, ev.token) for ev in returned] == [(rid, tok) for rid, _, tok in seen]
    assert all(tok is not None for _, _, tok in seen)


def test_eos_ends_a_row_and_the_rest_go_on(tiny):
    model, processor = tiny
    ref = model.generate(make_request(processor, 0, 1.0, 6).input_ids, pixel_values=make_request(
        processor, 0, 1.0, 6).pixel_values, max_new_tokens=6, eos_token_id=-1)[0, -6:].tolist()
    eos = ref[2]  # pretend the third token is EOS: the row ends there, EOS included
    engine = Engine(model, eos_token_id=eos)
    done, _ = run(engine, {0: [make_request(processor, 0, 1.0, 6)], 1: [make_request(processor, 1, 1.0, 4)]})
    assert done["r0"].token_ids == ref[: ref.index(eos) + 1] and done["r0"].finish_reason == "eos"
    assert len(done["r1"].token_ids) <= 4


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(tiny):
    model, processor = tiny

    def sampled(others):
        engine = Engine(model, eos_token_id=-1)
        reqs = [make_request(processor, 0, 1.0, 8, temperature=1.5, top_p=0.9, seed=1234)]
        reqs += [make_request(processor, k, 0.75, 5, temperature=1.0, seed=k) for k in range(1, 1 + others)]
        done, _ = run(engine, {0: reqs})
        return done["r0"].token_ids

    a, b = sampled(0), sampled(2)
    assert a == b
    engine = Engine(model, eos_token_id=-1)
    other_seed, _ = run(engine, {0: [make_request(processor, 0, 1.0, 8, temperature=1.5, top_p=0.9, seed=99)]})
    assert other_seed["r0"].token_ids != a  # the seed is what fixed it


def test_cancel_frees_the_row_and_the_others_are_unchanged(tiny):
    model, processor = tiny
    engine = Engine(model, eos_token_id=-1)
    engine.add(make_request(processor, 0, 1.0, 6))
    engine.add(make_request(processor, 1, 0.5, 6))
    tokens = {"r0": [], "r1": []}
    for step in range(6):
        for ev in engine.step():
            tokens[ev.request_id].append(ev.token)
        if step == 1:
            fin = engine.cancel("r1", "stop")
            assert fin.finish_reason == "stop" and fin.token_ids == tokens["r1"] and len(fin.token_ids) == 2
            assert (fin.joined_step, fin.finished_step) == (0, 1)
    assert not engine.has_work and not engine.pools
    _, ref = alone(model, processor, 0, 1.0, 6)
    assert tokens["r0"] == ref.token_ids
    assert engine.cancel("r1") is None


def test_logprobs_are_the_logits_log_softmax(tiny):
    model, processor = tiny
    engine = Engine(model, eos_token_id=-1)
    engine.add(make_request(processor, 0, 1.0, 3, top_logprobs=2))
    events = [ev for _ in range(3) for ev in engine.step()]
    fin = events[-1].finished
    for ev, logits in zip(events, fin.logits):
        lp = logits.log_softmax(-1)
        assert ev.token == int(lp.argmax()) and ev.logprob == pytest.approx(float(lp.max()), abs=1e-6)
        assert [t for t, _ in ev.top_logprobs] == lp.topk(2).indices.tolist()


def test_refused_by_name():
    model, processor = build_tiny("layer", "llama", token_selection="fastv")
    with pytest.raises(NotImplementedError, match="fastv"):
        Engine(model.eval())
    model, processor = build_tiny("layer", "llama")
    engine = Engine(model)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.add(make_request(processor, 0, 1.0, 0))
    with pytest.raises(ValueError, match="budget"):
        engine.add(make_request(processor, 0, 0.1, 3))
    engine.add(make_request(processor, 0, 1.0, 3))
    with pytest.raises(ValueError, match="already"):
        engine.add(make_request(processor, 0, 1.0, 3))


def test_per_row_query_slots_give_the_row_by_row_masks():
    """modeling._attention_masks with one query slot per row (the engine's decode step) == each row on its own,
    sliding window included (Mistral)."""
    model, _ = build_tiny("layer", "mistral", sliding_window=5)
    g = torch.Generator().manual_seed(0)
    key_valid = torch.rand(3, 12, generator=g) > 0.3
    slots = torch.tensor([4, 11, 7])
    batched = model._attention_masks(key_valid, slots[:, None], 12)
    assert set(batched) == {None, 5}
    for j in range(3):
        alone = model._attention_masks(key_valid[j : j + 1], slots[j : j + 1], 12)
        for window, mask in alone.items():
            assert torch.equal(batched[window][j : j + 1], mask)
