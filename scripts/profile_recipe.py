"""Where a recipe's step goes: run ``finetune/<recipe>.py`` in this process with its own command line, time each
micro-batch's forward and loss, its backward and each optimizer step, and print ``torch.profiler``'s operator table
over a few steps that follow some unprofiled ones (BENCHMARKS.md, "The recipe's step against the model's cost").

    python scripts/profile_recipe.py lora --skip 4 --active 3 -- --checkpoint_dir /tmp/smol --data JSON ...

The recipe's options follow ``--``, as on its own command line. Its ``--train.max_steps`` must exceed
``--skip + --active``, and ``--skip`` should pass the sensitivity pass (it runs between steps). The profiled steps
carry the profiler's overhead; the medians printed leave out each phase's first two calls (they warm caches up).
"""

import argparse
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

import lightning.fabric  # noqa: E402

from finetune import adapter, full, lora, loop, qlora, trainer  # noqa: E402

RECIPES = {"full": full, "lora": lora, "qlora": qlora, "adapter": adapter}
PHASES = ("forward+loss", "backward", "optimizer")


@contextmanager
def timed_phases(times: dict, on_step):
    """The loop's ``micro_batch_loss``, ``Fabric.backward`` and ``optimizer_step`` each timed into ``times`` and
    marked for the profiler (``## <phase>``); ``on_step`` runs after each optimizer step. What runs between steps
    (``after_step``: validation, the sensitivity pass) is left out of ``times``. Restored afterwards."""
    saved = loop.micro_batch_loss, loop.optimizer_step, lightning.fabric.Fabric.backward, loop.after_step
    between_steps = []

    def wrap(fn, phase: str, after=None):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            with torch.profiler.record_function(f"## {phase}"):
                out = fn(*args, **kwargs)
            if not between_steps:
                times[phase].append(time.perf_counter() - start)
            if after is not None:
                after()
            return out
        return timed

    def after_step(*args, **kwargs):
        between_steps.append(True)
        try:
            return saved[3](*args, **kwargs)
        finally:
            between_steps.clear()

    loop.micro_batch_loss = wrap(saved[0], "forward+loss")
    loop.optimizer_step = wrap(saved[1], "optimizer", on_step)
    lightning.fabric.Fabric.backward = wrap(saved[2], "backward")
    loop.after_step = after_step
    try:
        yield
    finally:
        loop.micro_batch_loss, loop.optimizer_step, lightning.fabric.Fabric.backward, loop.after_step = saved


def main(recipe: str, recipe_args: list, skip: int = 4, active: int = 3, rows: int = 40) -> dict:
    """Run the recipe; return the median seconds of each phase (per micro-batch; the optimizer's per step) and the
    operator table of the ``active`` profiled steps that follow ``skip`` unprofiled ones."""
    times, tables = defaultdict(list), []
    schedule = torch.profiler.schedule(wait=skip - 1, warmup=1, active=active, repeat=1)
    profiler = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], schedule=schedule,
        on_trace_ready=lambda p: tables.append(p.key_averages().table(sort_by="cpu_time_total", row_limit=rows)))
    argv = sys.argv
    sys.argv = [f"finetune/{recipe}.py", *recipe_args]
    try:
        with timed_phases(times, profiler.step), profiler:
            trainer.cli(RECIPES[recipe].setup)
    finally:
        sys.argv = argv
    if not tables:
        raise SystemExit(f"error: the run ended before {skip + active} steps: raise its --train.max_steps")
    medians = {phase: statistics.median(times[phase][2:] or times[phase]) for phase in PHASES}
    return {"medians": medians, "calls": {phase: len(times[phase]) for phase in PHASES},
            "steps": len(times["optimizer"]), "table": tables[0]}


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", choices=sorted(RECIPES))
    parser.add_argument("--skip", type=int, default=4, help="unprofiled steps first")
    parser.add_argument("--active", type=int, default=3, help="profiled steps")
    parser.add_argument("--rows", type=int, default=40, help="operators in the table")
    parser.add_argument("recipe_args", nargs=argparse.REMAINDER, help="-- then the recipe's options")
    args = parser.parse_args()
    recipe_args = args.recipe_args[1:] if args.recipe_args[:1] == ["--"] else args.recipe_args
    result = main(args.recipe, recipe_args, args.skip, args.active, args.rows)
    print(result["table"])
    print(", ".join(f"{phase} {1e3 * s:.0f} ms" for phase, s in result["medians"].items()),
          f"(medians of {result['steps']} steps, the first two calls of each left out; forward+loss and backward per"
          " micro-batch)")


if __name__ == "__main__":
    cli()
