"""What the gates cost at p = 0, block by block (``scripts/benchmark.py --profile true``): block 0 of our gated
model against block 0 of plain litgpt: ATen ops, Python calls and microseconds per block forward."""

import statistics
import time

import torch

from dropbp import DropBPHandler
from scripts.bench_model import ModelSpec, build, quantize
from scripts.bench_step import profiled_ops
from scripts.bench_time_per_sample import round_orders


def profile_gates(method: str, dims: dict, seq_len: int, micro_batch_size: int, rounds: int = 20,
                  calls: int = 50) -> dict:
    """What the gates cost at p = 0, block by block: block 0 of our gated model against block 0 of plain litgpt
    (same weights, same inputs, autograd recording): the ATen ops each dispatches (``torch.profiler``), the Python
    function calls each makes (``cProfile``) and the wall time of a block forward (``calls`` calls, ``rounds``
    rounds in shuffled order; min and median of the rounds). Python-bound shapes make the difference visible."""
    import cProfile
    import pstats

    spec = ModelSpec(method, None, dims, device="cpu", precision="32-true")
    gated = build(spec, seq_len)
    plain = build(spec, seq_len, plain=True)
    plain.load_state_dict(gated.state_dict())
    gated, plain = (quantize(spec, m) for m in (gated, plain))
    DropBPHandler(gated).keep_all()
    captured = {}

    def capture(module, args, kwargs):
        captured.update(args=args, kwargs=kwargs)

    handle = gated.transformer.h[0].register_forward_pre_hook(capture, with_kwargs=True)
    idx = torch.randint(0, gated.config.padded_vocab_size, (micro_batch_size, seq_len),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gated(idx)
    handle.remove()
    x = captured["args"][0].detach().requires_grad_(True)
    args, kwargs = (x, *captured["args"][1:]), captured["kwargs"]
    blocks = {"gated": gated.transformer.h[0], "plain": plain.transformer.h[0]}
    if not torch.equal(blocks["gated"](*args, **kwargs), blocks["plain"](*args, **kwargs)):
        raise AssertionError("the gated block at p = 0 differs from plain litgpt's")
    out = {"method": method}
    for name, block in blocks.items():
        out[f"aten_{name}"] = [op for op in profiled_ops(lambda: block(*args, **kwargs)) if op.startswith("aten::")]
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            block(*args, **kwargs)
        profiler.disable()
        out[f"python_calls_{name}"] = sum(v[1] for v in pstats.Stats(profiler).stats.values()) / calls
    times = {name: [] for name in blocks}
    for order in round_orders(list(blocks), rounds):
        for name in order:
            t0 = time.perf_counter()
            for _ in range(calls):
                blocks[name](*args, **kwargs)
            times[name].append((time.perf_counter() - t0) / calls * 1e6)
    for name in blocks:
        out[f"us_{name}_min"], out[f"us_{name}_median"] = min(times[name]), statistics.median(times[name])
    out["same_aten_ops"] = out["aten_gated"] == out["aten_plain"]
    out["aten_ops"] = len(out.pop("aten_gated"))
    out.pop("aten_plain")
    return out
