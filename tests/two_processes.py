"""The suite's two-process cases (gloo, on the CPU) in one launch: `python tests/two_processes.py OUT_DIR`, and
Fabric's launcher runs this file again for rank 1. Starting a pair of processes (the imports, the process group)
took most of each case's time, so the cases run in turn in one pair; each writes its records under OUT_DIR/CASE.
What a case patches is put back before the next; a case that stops with an error (the diverging loss) records its
line, as the CLI prints it, and the next case runs. tests/conftest.py launches this once per test run (the
`two_processes` fixture); the tests that read the records are in the cases' own modules."""

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

from finetune import full, loop, sensitivity_pass, trainer  # noqa: E402
from finetune import launch as launch_plan  # noqa: E402
from tests import test_distributed, test_faults, test_fsdp_resume, test_learning  # noqa: E402

CASES = {
    **{case: lambda out_dir, case=case: test_distributed.worker(case, out_dir)
       for case in ("lora", "full", "lora_qv", "nan", "fsdp")},
    **{f"collectives_{strategy}": lambda out_dir, strategy=strategy: test_distributed.collectives_worker(strategy,
                                                                                                         out_dir)
       for strategy in ("ddp", "fsdp")},
    "fsdp_resume": test_fsdp_resume.worker,
    "learning": test_learning.two_process_worker,
    "sigterm_reference": test_faults.two_process_reference,
}


def run_cases(out_dir: Path) -> None:
    import lightning.fabric.strategies.fsdp as lightning_fsdp
    import torch.distributed as dist

    from dropbp import DropBPHandler

    torch.set_num_threads(1)
    patched = [(DropBPHandler, "sample"), (loop, "CycleIterator"), (loop, "probe_batch"), (loop, "micro_batch_loss"),
               (loop, "save_training_state"), (sensitivity_pass, "compute_sensitivity"), (trainer, "fit"),
               (launch_plan, "choose_strategy"), (full, "finalize"), (lightning_fsdp, "_get_full_state_dict_context"),
               (sys, "argv")] + [(dist, name) for name in test_distributed.COLLECTIVES]
    for case, run in CASES.items():
        originals = [(owner, name, getattr(owner, name)) for owner, name in patched]
        case_dir = out_dir / case
        case_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        try:
            run(case_dir)
        except trainer.UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            (case_dir / f"error-rank{os.environ.get('LOCAL_RANK', '0')}.txt").write_text(f"error: {e}")
        finally:
            for owner, name, value in originals:
                setattr(owner, name, value)
            print(f"{case}: {time.perf_counter() - start:.1f} s")  # in the launch's stdout.txt


if __name__ == "__main__":
    run_cases(Path(sys.argv[1]))
