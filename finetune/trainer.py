"""The one training loop every recipe shares: litgpt's fine-tuning loop with DropBP (or PLD) in it.

Read top to bottom: `run` checks the arguments and builds Fabric, `main` builds the model, optimizer, data and
DropBP handler, `fit` trains (uniform rates until `sensitivity_at`, then the sensitivity pass and re-allocation),
and the method's `finalize` writes `final/` (LoRA merged into `lit_model.pth` like litgpt).
"""

import inspect
import json
import math
import os
import random
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, get_args, get_origin

import lightning as L
import torch
import yaml
from jsonargparse import CLI, set_parsing_settings
from lightning.fabric.plugins import BitsandbytesPrecision
from lightning.fabric.strategies import DDPStrategy, FSDPStrategy
from litgpt.args import EvalArgs, TrainArgs
from litgpt.config import Config
from litgpt.data import DataModule
from litgpt.model import Block
from litgpt.prompts import PromptStyle, prompt_styles, save_prompt_style
from litgpt.tokenizer import Tokenizer
from litgpt.utils import (
    CycleIterator,
    choose_logger,
    chunked_cross_entropy,
    copy_config_files,
    instantiate_torch_optimizer,
    num_parameters,
)
from tqdm import tqdm

from dropbp import DropBPHandler, PLDHandler, allocate_rates, check_rate, compute_sensitivity
from dropbp.lr import compensate_lr, param_groups, set_lr
from finetune.args import DropBPArgs, PLDArgs
from lit_gpt.data import Alpaca, Builtin  # importing lit_gpt.data also registers Dolly for --data
from lit_gpt.data.download import download_data_file
from lit_gpt.gated import compile_branches, compile_unsupported, set_gate_flops
from lit_gpt.quantize import QUANT_DTYPES, import_bitsandbytes, quantize_frozen_linears
from lit_gpt.tiny_model import TINY_MODEL_NOTE, ensure_tiny_checkpoint

REQUIRED_CHECKPOINT_FILES = ("lit_model.pth", "model_config.yaml")


class UsageError(Exception):
    """Bad input: the CLI prints the message as one line and exits with status 2."""


@dataclass
class Method:
    """What differs between recipes: the model class, what trains, and how `final/` is written."""

    name: str
    gpt_class: type
    config: Callable[[Path], Config]  # checkpoint_dir -> config with the method's extras (LoRA rank, ...)
    mark_trainable: Callable[[torch.nn.Module], None]
    finalize: Callable[[L.Fabric, torch.nn.Module, Path, Path], None]  # (fabric, model, checkpoint_dir, final_dir)
    full: bool = False  # full fine-tuning: every parameter trains
    quantize: Optional[str] = None  # QLoRA: the 4-bit format of the frozen base ("bnb.nf4", ...)
    options: dict = field(default_factory=dict)  # the recipe's own options (LoRA rank, targets, ...), recorded


def default_train_args() -> TrainArgs:
    """Sized for the built-in tiny model (a few minutes on 2 CPU cores); the config_hub YAMLs hold the paper's."""
    return TrainArgs(
        save_interval=100, log_interval=1, global_batch_size=16, micro_batch_size=4, lr_warmup_steps=10,
        epochs=None, max_steps=200, max_seq_length=None, min_lr=0.0,
    )


def default_eval_args() -> EvalArgs:
    return EvalArgs(interval=50, max_new_tokens=50, max_iters=20)


class Interrupted(Exception):
    """Ctrl-C, after the training state was saved: one line and exit status 130."""


EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED = 2, 3, 130


def cli(setup: Callable) -> None:
    """jsonargparse CLI around a recipe's `setup`. Every failure is one line on stderr with its own exit status:
    2 bad input (arguments, files, data), 3 a failure while running (torch, out of memory, ...), 130 Ctrl-C.
    DROPBP_TRACEBACK=1 shows the traceback of a failure instead."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # --help shows the dataclass fields' descriptions
    try:
        check_choices(setup, sys.argv[1:])
        CLI(setup)
    except (UsageError, ValueError, FileNotFoundError) as e:
        fail(f"error: {e}", EXIT_BAD_INPUT)
    except Interrupted as e:
        fail(f"interrupted: {e}", EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
    except Exception as e:
        if os.environ.get("DROPBP_TRACEBACK"):
            raise
        fail(f"error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
             " (DROPBP_TRACEBACK=1 shows the traceback)", EXIT_FAILED)


def fail(message: str, status: int) -> None:
    for bar in list(tqdm._instances):  # an open progress bar would be drawn again at exit, after the message
        bar.close()
    print(message, file=sys.stderr)
    raise SystemExit(status)


def check_choices(setup: Callable, argv: list) -> None:
    """Refuse a bad value of a choice option (a ``Literal``) naming the valid ones: jsonargparse 4.41 reports only
    "Cannot take a Union of no types"."""
    choices = {}
    for name, param in inspect.signature(setup).parameters.items():
        if get_origin(param.annotation) is Literal:
            choices[f"--{name}"] = get_args(param.annotation)
        if is_dataclass(param.default):
            for f in fields(param.default):
                if get_origin(f.type) is Literal:
                    choices[f"--{name}.{f.name}"] = get_args(f.type)
    for i, arg in enumerate(argv):
        key, _, value = arg.partition("=")
        if key in choices and not _:
            value = argv[i + 1] if i + 1 < len(argv) else None
        if key in choices and value not in choices[key]:
            raise UsageError(f"{key} must be one of {', '.join(map(str, choices[key]))}, got {value!r}")


# ------------------------------------------------------------------------------------------------ set-up
def resolve_checkpoint_dir(checkpoint_dir: Optional[Path]) -> Path:
    if checkpoint_dir is None:
        checkpoint_dir = ensure_tiny_checkpoint()
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # once, not once per process
            print(TINY_MODEL_NOTE)
        return checkpoint_dir
    checkpoint_dir = Path(checkpoint_dir).expanduser().resolve()
    if not checkpoint_dir.is_dir():
        raise UsageError(
            f"checkpoint dir {checkpoint_dir} not found (download one with `litgpt download <repo_id>`,"
            " or leave --checkpoint_dir out to use the built-in tiny model)"
        )
    missing = [f for f in REQUIRED_CHECKPOINT_FILES if not (checkpoint_dir / f).is_file()]
    if not any((checkpoint_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        missing.append("tokenizer.json or tokenizer.model")
    if missing:
        raise UsageError(f"checkpoint dir {checkpoint_dir} is incomplete: missing {', '.join(missing)}")
    return checkpoint_dir


def check_args(train: TrainArgs, dropbp: DropBPArgs, pld: PLDArgs, devices: int, num_nodes: int) -> None:
    """Everything that can be refused before the run starts is refused here, not after 10% of the run."""
    check_rate(dropbp.rate, "--dropbp.rate")
    check_rate(dropbp.max_rate, "--dropbp.max_rate")
    check_rate(dropbp.min_rate, "--dropbp.min_rate")
    if dropbp.allocation == "sensitivity" and dropbp.rate > dropbp.max_rate:  # bounds of the allocation only:
        raise UsageError(f"--dropbp.rate {dropbp.rate} is above --dropbp.max_rate {dropbp.max_rate}")  # uniform is
    if dropbp.allocation == "sensitivity" and dropbp.min_rate > dropbp.rate:  # `rate` on every branch
        raise UsageError(f"--dropbp.min_rate {dropbp.min_rate} is above --dropbp.rate {dropbp.rate}")
    if not 0.0 < dropbp.step <= 1.0:
        raise UsageError(f"--dropbp.step must be in (0, 1], got {dropbp.step}")
    if dropbp.probe_batch_size is not None and dropbp.probe_batch_size < 1:
        raise UsageError(f"--dropbp.probe_batch_size must be at least 1, got {dropbp.probe_batch_size}")
    for name in ("max_tokens", "tie_embeddings"):  # litgpt's fine-tuning recipes refuse them too
        if getattr(train, name) is not None:
            raise UsageError(f"--train.{name} is not supported by the fine-tuning recipes")
    if train.max_time is not None and train.max_time <= 0:
        raise UsageError(f"--train.max_time must be positive (seconds), got {train.max_time}")
    if not 0.0 <= dropbp.sensitivity_at < 1.0:
        raise UsageError(f"--dropbp.sensitivity_at must be in [0, 1), got {dropbp.sensitivity_at}")
    if pld.enabled and dropbp.rate > 0 and not pld.with_dropbp:
        raise UsageError("PLD and DropBP are both on: pass --pld.with_dropbp true to combine them on purpose")
    if train.micro_batch_size < 1:
        raise UsageError(f"--train.micro_batch_size must be at least 1, got {train.micro_batch_size}")
    if train.global_batch_size % (train.micro_batch_size * devices * num_nodes):
        raise UsageError(
            f"--train.global_batch_size {train.global_batch_size} must be a multiple of"
            f" micro_batch_size x devices x num_nodes = {train.micro_batch_size * devices * num_nodes}"
        )
    if not (train.max_steps or train.epochs):
        raise UsageError("set --train.max_steps or --train.epochs")


def run(
    method: Method,
    checkpoint_dir: Optional[Path],
    out_dir: Path,
    precision: Optional[str],
    devices: int,
    num_nodes: int,
    data: Optional[DataModule],
    train: TrainArgs,
    eval: EvalArgs,
    dropbp: DropBPArgs,
    pld: PLDArgs,
    optimizer: str | dict,
    logger_name: str,
    seed: int,
    resume: bool | str | Path,
    overwrite: bool = False,
    compile: bool = False,
) -> None:
    check_args(train, dropbp, pld, devices, num_nodes)
    if compile and devices * num_nodes != 1:
        raise UsageError("--compile true runs on one device (--devices 1): it is not tested with DDP or FSDP")
    builtin_model = checkpoint_dir is None
    checkpoint_dir = resolve_checkpoint_dir(checkpoint_dir)
    if data is None and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        print(f"No --data given: using {'the built-in data (--data Builtin)' if builtin_model else 'Alpaca'}")
    data = (Builtin() if builtin_model else Alpaca()) if data is None else data
    out_dir = Path(out_dir).expanduser().resolve()
    record = run_record(method, checkpoint_dir, out_dir, precision, devices, num_nodes, data, train, eval, dropbp,
                        pld, optimizer, logger_name, seed, compile)
    fabric_args, quantize_base = launch_plan(method, precision, devices, num_nodes)
    unsupported = compile_unsupported(quantized_on_cpu=quantize_base is not None) if compile else None
    if unsupported:
        raise UsageError(f"--compile true does not work with {unsupported}")
    config = method.config(checkpoint_dir)
    if train.max_seq_length is not None and train.max_seq_length > config.block_size:
        raise UsageError(
            f"--train.max_seq_length {train.max_seq_length} is above the model's block size {config.block_size}"
        )
    logger = choose_logger(logger_name, out_dir, name=f"finetune-{method.name}-{config.name}", log_interval=1)
    fabric = L.Fabric(**fabric_args, loggers=logger)
    fabric.launch(main, method, config, checkpoint_dir, out_dir, data, train, eval, dropbp, pld, optimizer, seed, resume,
                  quantize_base, record, overwrite, compile)


# ------------------------------------------------------------------------------------------------ out_dir
LOCK = "run.lock"
RECORD = "hyperparameters.yaml"  # litgpt's name: its tools (merge_lora) read the LoRA options from it
RESUME_MUST_MATCH = ("method", "dropbp", "pld")  # options a resumed run may not change


def run_record(method, checkpoint_dir, out_dir, precision, devices, num_nodes, data, train, eval, dropbp, pld,
               optimizer, logger_name, seed, compile=False) -> dict:
    """The options of a run, as a recipe's ``--config`` file (``python finetune/lora.py --config
    out/.../hyperparameters.yaml`` repeats it) plus the method's name."""
    data_args = {f.name: getattr(data, f.name) for f in fields(data) if f.init} if is_dataclass(data) else {}
    record = {
        "method": {"name": method.name, **method.options},
        "checkpoint_dir": str(checkpoint_dir), "out_dir": str(out_dir), "precision": precision, "devices": devices,
        "num_nodes": num_nodes,
        "data": {"class_path": f"{type(data).__module__}.{type(data).__qualname__}", "init_args": data_args},
        "train": asdict(train), "eval": asdict(eval), "dropbp": asdict(dropbp), "pld": asdict(pld),
        "optimizer": optimizer, "logger_name": logger_name, "seed": seed, "compile": compile,
    }
    return plain(record)


def plain(value):
    """YAML-safe copy: paths and prompt styles as strings."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, PromptStyle):
        return next((name for name, cls in prompt_styles.items() if type(value) is cls), type(value).__name__)
    return str(value)


def write_record(record: dict, folder: Path) -> None:
    """``hyperparameters.yaml`` (the recipe's options; the method's under ``method``)."""
    options = {k: v for k, v in record.items() if k != "method"}
    options.update({k: v for k, v in record.get("method", {}).items() if k != "name"})
    atomic_write_text(folder / RECORD, yaml.safe_dump(options, sort_keys=False))


def changed_options(saved: dict, current: dict) -> list:
    """The DropBP, PLD and method options that differ between two run records, as ``group.key old -> new``."""
    return [
        f"{group}.{key} {saved.get(group, {}).get(key)!r} -> {value!r}"
        for group in RESUME_MUST_MATCH for key, value in current.get(group, {}).items()
        if saved.get(group, {}).get(key) != value
    ]


def check_resumed_options(saved: Optional[dict], current: dict, path: Path) -> None:
    """Resuming with other DropBP, PLD or method options would silently train with the saved ones: refuse."""
    if saved is None:  # a checkpoint from before options were recorded
        return
    changed = changed_options(saved, current)
    if changed:
        raise UsageError(f"--resume: {path} was trained with other options ({'; '.join(changed)}): resume with the"
                         " saved ones, or start a new run in another --out_dir")


def finished_run_refusal(out_dir: Path, current: dict) -> str:
    """Why ``--resume auto`` may not start an out_dir that holds ``final/`` but no checkpoint anew: it would replace
    a finished run (naming the options that differ from the ones it was trained with)."""
    try:
        flat = yaml.safe_load((out_dir / "final" / RECORD).read_text()) or {}
    except (OSError, yaml.YAMLError):
        flat = {}
    # final/'s record is in the recipe's --config form: the method's options at the top level
    saved = {"dropbp": flat.get("dropbp", {}), "pld": flat.get("pld", {}),
             "method": {k: flat.get(k) for k in current.get("method", {}) if k != "name"}}
    changed = changed_options(saved, {**current, "method": {k: v for k, v in current.get("method", {}).items()
                                                            if k != "name"}})
    other = f"; it was trained with other options ({'; '.join(changed)})" if flat and changed else ""
    return (f"--resume auto: {out_dir} holds a finished run (final/) and no step-* checkpoint to continue{other}:"
            " --overwrite true replaces it, or use another --out_dir")


@dataclass
class Claim:
    """A run's hold on its out_dir: an OS lock on ``run.lock``, held open for the run's life (the OS frees it when
    the process dies, however it dies), and whether this run made the directory."""

    out_dir: Path
    created: bool
    lock_fd: int

    def release(self) -> None:
        """Drop the lock; a directory this run made and never started training in (refused or failed in set-up:
        ``hyperparameters.yaml`` is written just before the first step) is removed rather than left empty."""
        if self.created and not (self.out_dir / RECORD).exists():
            shutil.rmtree(self.out_dir, ignore_errors=True)  # the lock file with it, while still held
        else:
            (self.out_dir / LOCK).unlink(missing_ok=True)
        os.close(self.lock_fd)


def claim_out_dir(out_dir: Path, resume, overwrite: bool) -> tuple[Optional[str], Optional[Claim]]:
    """Take ``out_dir`` for this run, or say why not (one line). The lock is taken atomically (an exclusive
    ``flock``), so of two runs started at once into one directory exactly one gets it. A finished or checkpointed
    run is kept unless ``--resume`` continues it or ``--overwrite true`` replaces it."""
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    lock_fd, problem = take_lock(out_dir / LOCK)
    previous = [p.name for p in sorted(out_dir.glob("step-*")) + [out_dir / "final"] if p.exists()]
    if problem is None and previous and resume in (False, "false", "False", None) and not overwrite:
        problem = (f"{out_dir} already holds a run ({', '.join(previous[-3:])}): pass --resume auto to continue it,"
                   " --overwrite true to replace it, or another --out_dir")
    if problem is not None:
        if lock_fd is not None:  # without the lock, the directory is another run's: never touch it
            Claim(out_dir, created, lock_fd).release()
        return problem, None
    if previous and resume in (False, "false", "False", None):  # --overwrite true
        for name in previous + ["logs", "dropbp_allocation.json", "dropbp_allocation.png", RECORD]:
            target = out_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    return None, Claim(out_dir, created, lock_fd)


def take_lock(path: Path) -> tuple[Optional[int], Optional[str]]:
    """An exclusive, non-blocking ``flock`` on ``path`` (created if missing), with this host and pid written in it:
    (the open descriptor, None), or (None, why not). A lock file naming another host is respected too: ``flock``
    may not reach across the hosts of a shared file system."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 256).decode(errors="replace").split()
            os.close(fd)
            who = f"pid {owner[1]} on {owner[0]}" if len(owner) == 2 else "another process"
            return None, f"{path.parent} is in use by a running run ({who}; {path})"
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # the holder released and removed it between our open and our lock
            same_file = False
        if same_file:
            break
        os.close(fd)
    owner = os.read(fd, 256).decode(errors="replace").split()
    if len(owner) == 2 and owner[0] != socket.gethostname():
        os.close(fd)
        return None, f"{path.parent} is in use by a running run (pid {owner[1]} on {owner[0]}; {path})"
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{socket.gethostname()} {os.getpid()}".encode(), 0)
    return fd, None


# --------------------------------------------------------------------------------------------- GPU or CPU
def launch_plan(method: Method, precision: Optional[str], devices: int, num_nodes: int) -> tuple:
    """Every decision that differs between a GPU and a CPU, in one place: the arguments Fabric gets (precision,
    plugins, strategy, devices) and, for QLoRA, the function that quantizes the frozen base on the CPU (None when
    Lightning's bitsandbytes plugin does it on the GPU)."""
    cuda = torch.cuda.is_available()
    if precision is None:  # bf16 on CPU is 1.2-2x slower than fp32 and gains nothing there
        precision = ("bf16-true" if torch.cuda.is_bf16_supported() else "16-true") if cuda else "32-true"
    plugins, quantize_base = None, None
    if method.quantize is not None:
        if precision not in QUANT_DTYPES:
            raise UsageError(
                f"QLoRA needs one of --precision {', '.join(QUANT_DTYPES)} (got {precision!r}): mixed precision"
                " cannot be combined with 4-bit quantization"
            )
        if devices * num_nodes != 1:
            raise UsageError("QLoRA runs on one device (--devices 1), as in litgpt")
        mode, dtype = method.quantize[len("bnb."):], QUANT_DTYPES[precision]
        if cuda:  # litgpt's route; Fabric refuses a precision string next to a precision plugin
            import_bitsandbytes()  # first, quietly: the plugin imports it
            plugins, precision = BitsandbytesPrecision(mode, dtype), None
        else:  # Lightning refuses the plugin on CPU: bitsandbytes' own 4-bit layers, quantized when moved
            quantize_base = lambda model: quantize_frozen_linears(model, mode, dtype)  # noqa: E731
    args = dict(devices=devices, num_nodes=num_nodes, strategy=choose_strategy(method, devices * num_nodes, cuda),
                precision=precision, plugins=plugins)
    return args, quantize_base


def choose_strategy(method: Method, world_size: int, cuda: bool):
    """Full fine-tuning on GPUs: FSDP, as litgpt (Lightning has no FSDP on CPU). Otherwise DDP, whose gradients
    the training loop averages itself: the parameters of dropped branches keep ``.grad`` None on every rank."""
    if world_size == 1:
        return "auto"
    if method.full and cuda:
        return FSDPStrategy(
            auto_wrap_policy={Block}, activation_checkpointing_policy={Block}, state_dict_type="full",
            limit_all_gathers=True, cpu_offload=False,
        )
    return DDPStrategy()  # gradients are averaged by hand (see `average_gradients`), never by DDP's reducer


# ------------------------------------------------------------------------------------------------- main
def main(
    fabric: L.Fabric,
    method: Method,
    config: Config,
    checkpoint_dir: Path,
    out_dir: Path,
    data: DataModule,
    train: TrainArgs,
    eval: EvalArgs,
    dropbp: DropBPArgs,
    pld: PLDArgs,
    optimizer_spec: str | dict,
    seed: int,
    resume: bool | str | Path,
    quantize_base: Optional[Callable[[torch.nn.Module], torch.nn.Module]] = None,
    record: Optional[dict] = None,
    overwrite: bool = False,
    compile: bool = False,
) -> None:
    problem, claim = claim_out_dir(out_dir, resume, overwrite) if fabric.global_rank == 0 else (None, None)
    problem = fabric.broadcast(problem, src=0)
    if problem:
        raise UsageError(problem)
    try:
        train_in(fabric, method, config, checkpoint_dir, out_dir, data, train, eval, dropbp, pld, optimizer_spec,
                 seed, resume, quantize_base, record or {}, compile)
    finally:
        if claim is not None:
            claim.release()


def train_in(fabric, method, config, checkpoint_dir, out_dir, data, train, eval, dropbp, pld, optimizer_spec, seed,
             resume, quantize_base, record, compile=False) -> None:
    """Everything of a run once its out_dir is claimed (`main` releases the claim however this ends)."""
    resume_path = find_resume_path(out_dir, resume, fabric.print, record)
    fabric.seed_everything(seed)  # before the dataloaders: Fabric's DistributedSampler takes its shuffling seed from it
    tokenizer = Tokenizer(checkpoint_dir)
    if train.max_seq_length is None:  # litgpt would pass longer samples to the model, which refuses them
        fabric.print(f"--train.max_seq_length not set: samples are cut at the model's block size, {config.block_size}"
                     " tokens")
    limit_workers(data)
    data.connect(tokenizer=tokenizer, batch_size=train.micro_batch_size,
                 max_seq_length=train.max_seq_length or config.block_size)
    with fabric.rank_zero_first():
        prepare_data(data)
    setup_data(data)
    example = Example(tokenizer, data, eval)  # a bad --eval.evaluate_example is refused now, not after validation
    train_loader, val_loader = fabric.setup_dataloaders(data.train_dataloader(), data.val_dataloader())
    accum = train.global_batch_size // (train.micro_batch_size * fabric.world_size)
    steps_per_epoch = max(1, len(train_loader) // accum)
    max_steps = min(train.max_steps or math.inf, (train.epochs or math.inf) * steps_per_epoch)
    warmup = math.ceil(train.lr_warmup_fraction * steps_per_epoch) if train.lr_warmup_fraction else (
        train.lr_warmup_steps or 0)  # litgpt: a fraction of an epoch, or a number of optimizer steps

    # Skipping initialisation is only safe when the checkpoint holds every parameter (not LoRA or adapter weights).
    # Under FSDP it means the meta device: the weights are then loaded into the sharded model.
    empty_init = fabric.world_size > 1 and method.full
    load_after_setup = empty_init and isinstance(fabric.strategy, FSDPStrategy)
    with fabric.init_module(empty_init=empty_init):
        model = method.gpt_class(config)
    if not load_after_setup:
        state = load_checkpoint_file(checkpoint_dir / "lit_model.pth")
        model.load_state_dict(state.get("model", state), strict=False)
    method.mark_trainable(model)
    if quantize_base is not None:  # QLoRA on CPU: after the weights are in (4-bit state dicts differ)
        model = quantize_base(model)
    seq_len = train.max_seq_length or config.block_size
    model.max_seq_length = min(seq_len, config.block_size)
    set_gate_flops(model, model.max_seq_length)
    if compile:  # the branches only: the gates decide outside the compiled code, so masks never recompile
        compile_branches(model)

    handler = DropBPHandler(model, rate=dropbp.rate, sampling=dropbp.sampling, seed=seed if dropbp.seed is None else dropbp.seed)
    pld_handler = PLDHandler(model, pld.theta_bar, pld.gamma, seed=seed, total_steps=max_steps,
                             target_drop=pld.target_drop) if pld.enabled else None
    fabric.print(
        f"Trainable parameters: {num_parameters(model, requires_grad=True):,} | frozen:"
        f" {num_parameters(model, requires_grad=False):,} | {len(handler.gates)} gated branches,"
        f" DropBP rate {dropbp.rate} ({dropbp.allocation}, {dropbp.sampling}){' + PLD' if pld.enabled else ''}"
        f"{', branches compiled' if compile else ''}"
    )

    model = fabric.setup_module(model)
    if load_after_setup:
        fabric.load_raw(checkpoint_dir / "lit_model.pth", model, strict=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = instantiate_torch_optimizer(optimizer_spec, param_groups(handler, trainable))
    optimizer = fabric.setup_optimizers(optimizer)
    compensate_lr(optimizer, handler, enabled=dropbp.lr_compensation, accum=accum)
    base_lr = optimizer.param_groups[0]["lr"]  # the schedule's peak; read before a resumed state overwrites it

    progress = {"step": 0, "iter": 0, "best_val": None}
    if resume_path is not None:
        restored = fabric.load(resume_path, {"model": model, "optimizer": optimizer}, strict=False, weights_only=True)
        check_resumed_options(restored.get("record"), record, resume_path)
        progress.update(restored["progress"])
        handler.load_state_dict(restored["dropbp"])
        if pld_handler is not None:
            pld_handler.load_state_dict(restored["pld"])
        compensate_lr(optimizer, handler, enabled=dropbp.lr_compensation, accum=accum)
        fabric.print(f"Resumed from {resume_path} at step {progress['step']}")
        restored_rng = restored["rng"]
    else:
        restored_rng = None

    if eval.initial_validation and resume_path is None:  # as litgpt: the whole validation set, before training
        val_loss = validate(fabric, model, val_loader, len(val_loader), pld_handler)
        fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(val_loss)}, step=0)
        fabric.print(f"Initial evaluation | val loss: {val_loss:.3f} | val ppl: {math.exp(val_loss):.3f}")
    else:  # a quick check that validation works, so a problem shows now and not after training
        validate(fabric, model, val_loader, 2, pld_handler)
    if fabric.global_rank == 0:  # also marks the run as started: see Claim.release
        write_record(record, out_dir)
    before = weight_fingerprints(fabric, model)
    fit(fabric, method, model, optimizer, handler, pld_handler, train_loader, val_loader, warmup, train, eval,
        dropbp, out_dir, accum, max_steps, base_lr, progress, restored_rng, example, record)
    report_moved(fabric, before, weight_fingerprints(fabric, model))

    # the model is saved before the final validation, so that nothing trained is lost to an error there
    final_dir = out_dir / "final"
    if fabric.global_rank == 0:
        final_dir.mkdir(parents=True, exist_ok=True)
    fabric.barrier()
    method.finalize(fabric, model, checkpoint_dir, final_dir)
    if fabric.global_rank == 0:
        copy_config_files(checkpoint_dir, final_dir)
        save_prompt_style(data.prompt_style, final_dir)
        write_record(record, final_dir)
    fabric.barrier()
    fabric.print(f"Saved the fine-tuned model to {final_dir}")
    if eval.final_validation:
        val_loss = validate(fabric, model, val_loader, len(val_loader), pld_handler)
        fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(val_loss)}, step=progress["step"])
        fabric.print(f"Final evaluation | val loss: {val_loss:.3f} | val ppl: {math.exp(val_loss):.3f}")


def limit_workers(data: DataModule) -> None:
    """At most one data-loading worker per CPU core this process may use: litgpt's Alpaca and JSON modules ask for 4,
    and PyTorch warns on every run on a smaller machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if getattr(data, "num_workers", 0) > cores:
        data.num_workers = cores


def weight_fingerprints(fabric, model) -> torch.Tensor:
    """One number per trainable tensor that changes whenever the tensor does: its sum in float64 (no full-size copy;
    under FSDP the shards' sums, added up over ranks)."""
    sums = torch.stack([p.detach().sum(dtype=torch.float64) for p in model.parameters() if p.requires_grad])
    if isinstance(fabric.strategy, FSDPStrategy):
        sums = fabric.all_reduce(sums, reduce_op="sum")
    return sums.cpu()


def report_moved(fabric, before: torch.Tensor, after: torch.Tensor) -> None:
    """How many trainable tensors training changed; a run that changed none learned nothing, whatever its exit
    status, and says so."""
    moved = int((before != after).sum())
    fabric.print(f"Trainable tensors changed by training: {moved} of {len(before)}")
    if moved == 0:
        fabric.print("warning: no trainable weight changed: this run learned nothing (a learning rate of 0? no"
                     " optimizer step?)")


def prepare_data(data: DataModule) -> None:
    """``data.prepare_data()``, with the file of a downloading module (Alpaca, Dolly) fetched first, checked."""
    url, folder, name = (getattr(data, a, None) for a in ("file_url", "download_dir", "file_name"))
    if url and folder and name:
        path = Path(folder) / name
        if not (path.is_file() and path.stat().st_size > 0):
            download_data_file(url, path)
    data.prepare_data()


def setup_data(data: DataModule) -> None:
    """``data.setup()``, with a malformed file reported as one clear error before training starts, not as a
    traceback from a dataloader half-way through the run."""
    source = getattr(data, "json_path", None) or type(data).__name__
    try:
        data.setup()
    except json.JSONDecodeError as e:
        raise UsageError(f"{source}: not valid JSON ({e})") from None
    for dataset, name in ((data.train_dataset, "training"), (validation_split(data), "validation")):
        if len(dataset) == 0:
            raise UsageError(f"{source}: the {name} split is empty (too few records for the split; a JSON file's"
                             " --data.val_split_fraction sets the validation share)")
    for split in ("train_dataset", "val_dataset", "test_dataset"):
        records = getattr(getattr(data, split, None), "data", None)
        for i, record in enumerate(records or []):
            if not isinstance(record, dict):
                raise UsageError(f"{source}: record {i} of the {split[:-8]} split is not a JSON object")
            missing = [f for f in ("instruction", "output") if not isinstance(record.get(f), str)]
            if missing:
                raise UsageError(f"{source}: record {i} of the {split[:-8]} split lacks field(s) {', '.join(missing)}")


def validation_split(data: DataModule):
    """litgpt's modules keep it as ``test_dataset`` (Alpaca, JSON, Dolly), ours as ``val_dataset`` (Builtin)."""
    dataset = getattr(data, "test_dataset", None)
    return dataset if dataset is not None else data.val_dataset


# -------------------------------------------------------------------------------------------------- fit
def fit(
    fabric, method, model, optimizer, handler, pld_handler, train_loader, val_loader, warmup, train, eval, dropbp,
    out_dir, accum, max_steps, base_lr, progress, restored_rng, example, record,
) -> None:
    train_iter = CycleIterator(train_loader)
    for _ in range(progress["iter"]):  # resume: replay the data order up to where the saved run stopped
        next(train_iter)
    if restored_rng is not None:
        set_rng_state(restored_rng)

    bar = tqdm(total=max_steps if math.isfinite(max_steps) else None, initial=progress["step"],
               disable=fabric.global_rank != 0, desc=f"{method.name} p={dropbp.rate}", dynamic_ncols=True)
    write = bar.write if fabric.global_rank == 0 else (lambda line: None)  # below the bar, once
    state = training_state(handler, pld_handler, progress)  # as of the last completed step, for a save on Ctrl-C
    try:
        train_steps(fabric, method, model, optimizer, handler, pld_handler, train_iter, val_loader, warmup, train, eval,
                    dropbp, out_dir, accum, max_steps, base_lr, progress, example, record, bar, write, state)
    except KeyboardInterrupt:
        bar.close()
        raise Interrupted(save_on_interrupt(fabric, model, optimizer, state, record, out_dir)) from None
    bar.close()


def train_steps(fabric, method, model, optimizer, handler, pld_handler, train_iter, val_loader, warmup, train, eval,
                dropbp, out_dir, accum, max_steps, base_lr, progress, example, record, bar, write, state) -> None:
    max_time = train.max_time or math.inf  # seconds of wall time since training started, as litgpt
    allocate_at = int(dropbp.sensitivity_at * max_steps) if math.isfinite(max_steps) else None
    needs_allocation = dropbp.rate > 0 and dropbp.allocation == "sensitivity" and pld_handler is None
    trainable = [p for p in model.parameters() if p.requires_grad]
    sharded = isinstance(fabric.strategy, FSDPStrategy)
    sync_by_hand = fabric.world_size > 1 and not sharded
    metric = dropbp.sensitivity if dropbp.sensitivity != "auto" else ("gradnorm" if method.full else "grad")
    probe = probe_batch(train_iter.iterable, dropbp.probe_batch_size or train.micro_batch_size, fabric)
    window = {"loss": 0.0, "fw": 0.0, "bw": 0.0, "drop": 0.0, "n": 0}
    kept = torch.zeros(len(handler.gates), dtype=torch.bool)  # branches back-propagated in this optimizer step
    step_t0 = fit_t0 = time.perf_counter()
    while progress["step"] < max_steps:
        if train.epochs is not None and train_iter.epoch >= train.epochs:
            break
        batch = next(train_iter)
        progress["iter"] += 1
        is_accumulating = progress["iter"] % accum != 0
        if pld_handler is not None:
            pld_handler.sample(progress["step"])
        if dropbp.rate > 0 or pld_handler is None:
            handler.sample()
        kept |= torch.tensor([not (g.dropped or g.skipped) for g in handler.gates])

        t0 = time.perf_counter()
        # FSDP reduces every micro-batch: under its no_sync, a block that took part in an unsynchronised micro-batch
        # but is dropped in the step's last one fails FSDP's final check ("should use `_saved_grad_shard`")
        with fabric.no_backward_sync(model, enabled=(is_accumulating and not sharded) or sync_by_hand):
            loss = micro_batch_loss(model, batch)
            t1 = sync_time(fabric)
            # No graph when the kept branches hold nothing trainable (LoRA on q and v only, every branch dropped):
            # this micro-batch adds nothing to any gradient.
            if loss.requires_grad:
                fabric.backward(loss / accum)
            t2 = sync_time(fabric)
        if sync_by_hand and not is_accumulating:
            average_gradients(fabric, trainable)
        loss_value = loss.item()
        diverged = not math.isfinite(loss_value)
        if fabric.world_size > 1:  # stop every rank together: the others would wait forever in the next collective
            diverged = bool(fabric.all_reduce(torch.tensor(float(diverged)), reduce_op="max").item())
        if diverged:
            raise UsageError(f"non-finite loss in step {progress['step'] + 1} (micro-batch {progress['iter']}, loss"
                             f" {loss_value} here): stopping; the checkpoints saved so far are intact")
        window["loss"] += loss_value
        window["fw"] += t1 - t0
        window["bw"] += t2 - t1
        window["drop"] += handler.realised_rate if pld_handler is None else pld_handler.skipped_fraction
        window["n"] += 1
        if is_accumulating:
            continue

        lr = lr_at(progress["step"], base_lr, warmup, max_steps, train.min_lr)
        set_lr(optimizer, lr)
        if train.max_norm is not None:
            fabric.clip_gradients(model, optimizer, max_norm=train.max_norm)
        if sharded:
            clear_dropped_gradients(handler, kept)
        kept[:] = False
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress["step"] += 1
        step_time = time.perf_counter() - step_t0
        n = window["n"]
        metrics = {
            "loss": window["loss"] / n, "step": progress["step"], "iter": progress["iter"], "learning_rate": lr,
            "step_time": step_time, "forward_time": window["fw"], "backward_time": window["bw"],
            "drop_rate": window["drop"] / n, "epoch": train_iter.epoch,
        }
        window = dict.fromkeys(window, 0.0)
        if progress["step"] % train.log_interval == 0:
            fabric.log_dict(metrics, step=progress["step"])
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", fw=f"{metrics['forward_time']*1e3:.0f}ms",
                        bw=f"{metrics['backward_time']*1e3:.0f}ms", drop=f"{metrics['drop_rate']:.2f}")
        bar.update(1)

        if needs_allocation and not handler.allocated and allocate_at is not None and progress["step"] >= allocate_at:
            t_alloc = time.perf_counter()
            allocate(fabric, model, handler, probe, dropbp, metric, out_dir, progress["step"], write)
            compensate_lr(optimizer, handler, enabled=dropbp.lr_compensation, accum=accum)
            fabric.log_dict({"sensitivity_time": time.perf_counter() - t_alloc}, step=progress["step"])
        if progress["step"] % eval.interval == 0:
            val_loss = validate(fabric, model, val_loader, eval.max_iters, pld_handler)
            fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(val_loss)}, step=progress["step"])
            write(f"step {progress['step']}: val loss {val_loss:.4f}")
            example.generate(fabric, model, write)
        state.update(training_state(handler, pld_handler, progress))
        if train.save_interval is not None and progress["step"] % train.save_interval == 0:
            save_training_state(fabric, model, optimizer, state, record, out_dir)
        out_of_time = time.perf_counter() - fit_t0 > max_time
        if math.isfinite(max_time) and fabric.world_size > 1:  # every rank stops after the same step
            out_of_time = bool(fabric.all_reduce(torch.tensor(float(out_of_time)), reduce_op="max").item())
        if out_of_time:
            write(f"--train.max_time {train.max_time:g}s reached after step {progress['step']}: stopping")
            break
        step_t0 = time.perf_counter()  # validation and saving are not training time


def average_gradients(fabric, params) -> None:
    """Average the accumulated gradients over ranks: one small collective for which parameters hold a gradient on
    any rank, then one per gradient dtype, in the order of first appearance in ``params`` (the same on every rank,
    where a set's order differs between processes). Every rank drops the same branches, but a parameter may still
    hold a gradient on one rank only (a MoE expert no token of this rank's batch was routed to): it takes zeros
    there, so the flat buffers line up; a parameter without gradient on every rank (a dropped branch) stays None.

    Under DDP this replaces DDP's own synchronisation (every forward runs in ``no_backward_sync``). DDP remembers
    which parameters were used in unsynchronised micro-batches and all-reduces them at the next synchronised
    backward; when a step's last micro-batch has no backward (nothing trainable kept), that memory leaks into the
    next step, whose backward then fails on a parameter without gradient ("Encountered gradient which is
    undefined, but still allreduced by DDP reducer")."""
    params = list(params)
    held = fabric.all_reduce(torch.tensor([float(p.grad is not None) for p in params]), reduce_op="max")
    for p, anywhere in zip(params, held.tolist()):
        if anywhere and p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    for dtype in dict.fromkeys(g.dtype for g in grads):
        same = [g for g in grads if g.dtype == dtype]
        flat = fabric.all_reduce(torch.cat([g.reshape(-1) for g in same]), reduce_op="mean")
        for g, part in zip(same, flat.split([g.numel() for g in same])):
            g.copy_(part.view_as(g))


def clear_dropped_gradients(handler, kept: torch.Tensor) -> None:
    """FSDP gives every parameter of a unit that took part in backward a gradient, zeros for a branch dropped in
    every micro-batch of the step. Set those to None, as on one device or under DDP, so the optimizer leaves them
    (weight decay, momentum, Adam state) alone."""
    live = {id(p) for gate, k in zip(handler.gates, kept.tolist()) if k for p in gate.branch_parameters()}
    for gate, k in zip(handler.gates, kept.tolist()):
        if not k:
            for p in gate.branch_parameters():
                if id(p) not in live:
                    p.grad = None


def micro_batch_loss(model, batch) -> torch.Tensor:
    input_ids, targets = batch["input_ids"], batch["labels"]
    logits = model(input_ids, lm_head_chunk_size=128)
    logits[-1] = logits[-1][..., :-1, :]  # output n predicts token n+1
    return chunked_cross_entropy(logits, targets[..., 1:])


def sync_time(fabric) -> float:
    if fabric.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def lr_at(step: int, base_lr: float, warmup: int, max_steps: float, min_lr: float) -> float:
    """Linear warm-up then cosine decay to min_lr (litgpt's schedule shape)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if not math.isfinite(max_steps):
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def probe_batch(train_loader, size: int, fabric) -> dict:
    """A fixed batch of training samples for the sensitivity pass (drawn apart from the training order, so the
    data the run trains on is the same with or without the pass)."""
    dataset = train_loader.dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(1234)).tolist()[:size]
    batch = train_loader.collate_fn([dataset[i] for i in order])
    return {k: v.to(fabric.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def allocate(fabric, model, handler, probe, dropbp, metric, out_dir, step: int, write=print) -> None:
    t0 = time.perf_counter()
    sync_by_hand = fabric.world_size > 1 and not isinstance(fabric.strategy, FSDPStrategy)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def probe_loss():
        with fabric.no_backward_sync(model, enabled=sync_by_hand):  # as in training: DDP never syncs by itself
            return micro_batch_loss(model, probe)

    def probe_backward(loss):
        fabric.backward(loss)
        if sync_by_hand:
            average_gradients(fabric, trainable)

    sensitivity = compute_sensitivity(handler, model, probe_loss, metric=metric, backward=probe_backward)
    # Every rank probes the same batch. Under DDP the probe gradients are averaged, so the sensitivities agree; under
    # FSDP each rank holds a shard of every gradient, and the shards' parts add up ("gradnorm" then takes the norm
    # of each shard of a tensor rather than of the whole tensor).
    if isinstance(fabric.strategy, FSDPStrategy):
        sensitivity = fabric.all_reduce(sensitivity, reduce_op="sum").cpu()
    if not torch.isfinite(sensitivity).all():
        raise UsageError(f"non-finite sensitivity in the pass after step {step} (the probe's loss or gradients"
                         " diverged): stopping; the checkpoints saved so far are intact")
    # weigh the branches at the length this run trains on, not the model's context (attention grows as s^2)
    set_gate_flops(getattr(model, "module", model), probe["input_ids"].size(1))
    rates = allocate_rates(
        sensitivity.tolist(), handler.flops.tolist(), dropbp.rate, dropbp.step, dropbp.max_rate, dropbp.min_rate
    )
    rates = fabric.broadcast(rates, src=0)  # one allocation everywhere, even if rounding split a tie differently
    handler.set_rates(rates)
    handler.allocated = True
    write(
        f"Sensitivity pass ({metric}, {len(handler.gates)} branches, {time.perf_counter() - t0:.1f}s): rates"
        f" re-allocated, FLOPs-weighted mean {handler.mean_rate:.3f} (target {dropbp.rate})"
    )
    if fabric.global_rank == 0:
        report = {
            "metric": metric, "target_rate": dropbp.rate, "mean_rate": handler.mean_rate,
            "branches": [
                {"layer": g.layer, "kind": g.kind, "flops": g.flops, "sensitivity": s, "rate": r}
                for g, s, r in zip(handler.gates, sensitivity.tolist(), rates)
            ],
        }
        atomic_write_text(out_dir / "dropbp_allocation.json", json.dumps(report, indent=2))
        plot_allocation(report, out_dir / "dropbp_allocation.png")


def plot_allocation(report: dict, path: Path) -> None:
    """Sensitivity and drop rate per branch, like the paper's Figs. 6a and 8."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for kind, color in (("attn", "tab:blue"), ("mlp", "tab:orange")):
        rows = [b for b in report["branches"] if b["kind"] == kind]
        ax1.bar([b["layer"] + (0.2 if kind == "mlp" else -0.2) for b in rows], [b["sensitivity"] for b in rows],
                width=0.4, color=color, label=kind)
        ax2.bar([b["layer"] + (0.2 if kind == "mlp" else -0.2) for b in rows], [b["rate"] for b in rows],
                width=0.4, color=color, label=kind)
    ax1.set_ylabel(f"sensitivity ({report['metric']})")
    ax2.set_ylabel("drop rate")
    ax2.set_xlabel("layer")
    ax2.set_title(f"target {report['target_rate']}, FLOPs-weighted mean {report['mean_rate']:.3f}")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path.with_suffix(".tmp.png"))
    plt.close(fig)
    os.replace(path.with_suffix(".tmp.png"), path)


class Example:
    """litgpt's sample generation at each validation (`--eval.evaluate_example`, `--eval.max_new_tokens`): one
    record of the validation split (else the training split), prompted with its input too, answered by sampling
    at temperature 0.8 under a forked RNG, so that generating never changes the training run."""

    def __init__(self, tokenizer, data, eval: EvalArgs) -> None:
        self.tokenizer, self.prompt_style, self.max_new_tokens = tokenizer, data.prompt_style, eval.max_new_tokens
        records = validation_split(data).data or data.train_dataset.data
        choice = eval.evaluate_example
        if isinstance(choice, str) and choice.isdigit():  # jsonargparse reads `--eval.evaluate_example 3` as "3"
            choice = int(choice)
        if choice == "first":
            choice = 0
        elif choice == "random":
            choice = random.Random(len(records)).randrange(len(records))  # fixed, so every rank picks the same
        elif not isinstance(choice, int) or not 0 <= choice < len(records):
            raise UsageError(f"--eval.evaluate_example must be first, random or an index below {len(records)},"
                             f" got {eval.evaluate_example!r}")
        self.record = records[choice]

    @torch.no_grad()
    def generate(self, fabric, model, write: Callable[[str], None]) -> None:
        if not self.max_new_tokens:
            return
        from litgpt.generate.base import generate

        prompt = self.prompt_style.apply(self.record["instruction"], input=self.record.get("input", ""))
        encoded = self.tokenizer.encode(prompt, device=fabric.device)
        max_returned = len(encoded) + self.max_new_tokens
        if max_returned > model.max_seq_length:
            write(f"example not generated: its prompt ({len(encoded)} tokens) + --eval.max_new_tokens"
                  f" {self.max_new_tokens} exceed the training length {model.max_seq_length}")
            return
        model.eval()
        with torch.random.fork_rng(devices=[fabric.device] if fabric.device.type == "cuda" else []):
            with fabric.init_tensor():
                model.set_kv_cache(batch_size=1)
            output = generate(model, encoded, max_returned_tokens=max_returned, temperature=0.8,
                              eos_id=self.tokenizer.eos_id)
            model.clear_kv_cache()
        model.train()
        if fabric.global_rank == 0:
            write(f"{self.record['instruction']} -> {self.tokenizer.decode(output[len(encoded):])!r}")


@torch.no_grad()
def validate(fabric, model, val_loader, max_iters: int, pld_handler=None) -> float:
    """Validation loss with every branch kept (DropBP never changes the forward; PLD is switched off)."""
    model.eval()
    if pld_handler is not None:
        pld_handler.disable()
    losses = []
    for k, batch in enumerate(val_loader):
        if k >= max_iters:
            break
        logits = model(batch["input_ids"])
        losses.append(chunked_cross_entropy(logits[..., :-1, :], batch["labels"][..., 1:], chunk_size=0))
    model.train()
    val_loss = torch.stack(losses).mean()
    return fabric.all_reduce(val_loss, reduce_op="mean").item()


# ---------------------------------------------------------------------------------------- checkpointing
def get_rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(handler, pld_handler, progress) -> dict:
    """What `--resume` needs besides the model and optimizer, as of now (the end of a completed step)."""
    return {"progress": dict(progress), "dropbp": handler.state_dict(),
            "pld": pld_handler.state_dict() if pld_handler is not None else None, "rng": get_rng_state()}


def save_training_state(fabric, model, optimizer, state: dict, record: dict, out_dir: Path) -> Path:
    """Everything `--resume` needs, written to a temporary name and renamed, so a kill never leaves a torn file;
    the run's options beside it (``hyperparameters.yaml``) and inside it (resuming with other options is refused)."""
    path = out_dir / f"step-{state['progress']['step']:06d}" / "training_state.pth"
    tmp = path.with_name(path.name + ".tmp")
    if fabric.global_rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_record(record, path.parent)
    fabric.barrier()
    trainable = trainable_names(model)
    fabric.save(tmp, {"model": model, "optimizer": optimizer, "record": record, **state},
                filter={"model": lambda name, _: name in trainable})
    if fabric.global_rank == 0:
        os.replace(tmp, path)
    fabric.barrier()
    return path


def save_on_interrupt(fabric, model, optimizer, state: dict, record: dict, out_dir: Path) -> str:
    """Ctrl-C: save the last completed step (one process; several processes each get the signal at a different
    point, so a collective save could hang) and say how to continue."""
    step = state["progress"]["step"]
    saved = out_dir / f"step-{step:06d}" / "training_state.pth"
    if fabric.world_size == 1 and step > 0 and not saved.is_file():
        saved = save_training_state(fabric, model, optimizer, state, record, out_dir)
    if saved.is_file():
        return f"{saved} holds step {step}; continue with --resume auto"
    return "nothing saved yet" if step == 0 else f"steps since the last checkpoint are lost (step {step})"


def find_resume_path(out_dir: Path, resume: bool | str | Path, warn: Callable[[str], None] = print,
                     record: Optional[dict] = None) -> Optional[Path]:
    """The checkpoint to resume from. ``auto``: the latest that loads; a torn or corrupt one is skipped with a
    warning (the previous intact one is used), and an out_dir with none starts from scratch, said so, unless it holds
    a finished run (``final/``), which is refused rather than replaced. Checkpoints are read as tensors and plain
    values only (``weights_only``): unpickling an arbitrary file in the out_dir could run any code."""
    if resume is False or resume in ("false", "False", None):
        return None
    if resume is True or resume == "auto":
        for path in sorted(out_dir.glob("step-*/training_state.pth"), reverse=True):
            problem = unreadable(path)
            if problem is None:
                return path
            warn(f"warning: {path} cannot be read ({problem}); trying the previous checkpoint")
        if (out_dir / "final").exists():
            raise UsageError(finished_run_refusal(out_dir, record or {}))
        warn(f"--resume auto: no checkpoint in {out_dir}, starting from scratch")
        return None
    path = Path(resume).expanduser().resolve()
    if path.is_dir():
        path = path / "training_state.pth"
    if not path.is_file():
        raise UsageError(f"--resume {resume}: no training_state.pth there")
    problem = unreadable(path)
    if problem is not None:
        raise UsageError(f"--resume {resume}: {path} cannot be read as a training state ({problem})")
    return path


def unreadable(path: Path) -> Optional[str]:
    """Why ``path`` does not load as tensors and plain values (a torn zip, a truncated file, a pickle of other
    objects), or None. Every checkpoint is probed so before Fabric loads it (under FSDP, with a full unpickler)."""
    try:
        torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        return type(e).__name__
    return None


def load_checkpoint_file(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise UsageError(f"{path} cannot be read as a litgpt checkpoint ({type(e).__name__}): re-download or"
                         " re-convert it") from None


def trainable_names(model) -> set:
    """Names of the trainable parameters as they appear in the saved state dict (without Fabric's wrapper)."""
    return {n for n, p in getattr(model, "module", model).named_parameters() if p.requires_grad}


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_weights(fabric, model, path: Path, keep: Callable[[str], bool] = lambda name: True) -> None:
    """Write a state dict (keys filtered by ``keep``) atomically, as litgpt's tools expect: a plain state dict."""
    tmp = path.with_name(path.name + ".tmp")
    fabric.save(tmp, {"model": model}, filter={"model": lambda name, _: keep(name)})
    if fabric.global_rank == 0:
        state = torch.load(tmp, weights_only=True)["model"]
        torch.save(state, tmp)
        os.replace(tmp, path)
    fabric.barrier()
