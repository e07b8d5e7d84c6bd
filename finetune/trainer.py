"""The set-up every recipe shares, read top to bottom: `run` checks the options and starts Fabric, `main` claims the
out_dir, `train_in` builds the data, model, optimizer and DropBP handler into a `loop.Run`, `loop.fit` trains, and
the method's `finalize` writes `final/` (LoRA merged into `lit_model.pth` like litgpt).

Where the rest lives: `cli` (the command line and its errors), `out_dir` (the claim and the recorded options),
`launch` (GPU or CPU: precision, plugins, strategy), `data_setup`, `loop` (the training loop), `sensitivity_pass`,
`evaluation` (validation and the sample answer), `checkpoint` (saving and resuming).
"""

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal, Optional, Union

import lightning as L
import torch
from lightning.fabric.strategies import FSDPStrategy
from litgpt.args import EvalArgs, TrainArgs
from litgpt.config import Config
from litgpt.data import DataModule
from litgpt.prompts import save_prompt_style
from litgpt.tokenizer import Tokenizer
from litgpt.utils import choose_logger, copy_config_files, instantiate_torch_optimizer, num_parameters

from dropbp import DropBPHandler, PLDHandler, check_rate
from dropbp.lr import compensate_lr, param_groups
from finetune.args import DropBPArgs, PLDArgs
from finetune.checkpoint import check_complete, find_resume_path, load_checkpoint_file, restored_rng
from finetune.cli import Interrupted, UsageError, cli  # noqa: F401 (re-exported: the recipes' entry point)
from finetune.data_setup import limit_workers, prepare_data, setup_data
from finetune.evaluation import Example, validate
from finetune.launch import launch_plan, resolve_checkpoint_dir
from finetune.loop import Run, fit, report_moved, weight_fingerprints
from finetune.out_dir import check_resumed_options, claim_out_dir, finished_run, run_record, write_record
from finetune.signals import stop_signals
from lit_gpt.data import Alpaca, Builtin  # importing lit_gpt.data also registers Dolly for --data
from lit_gpt.gated import compile_branches, compile_unsupported, set_gate_flops


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


@dataclass
class Options:
    """A recipe's command line as the trainer takes it (the recipe's own options travel in its `Method`)."""

    checkpoint_dir: Optional[Path]
    out_dir: Path
    precision: Optional[str]
    devices: int
    num_nodes: int
    data: Optional[DataModule]
    train: TrainArgs
    eval: EvalArgs
    dropbp: DropBPArgs
    pld: PLDArgs
    optimizer: Union[str, dict]
    logger_name: str
    seed: int
    resume: Union[bool, Literal["auto"], Path]
    overwrite: bool = False
    compile: bool = False


def default_train_args() -> TrainArgs:
    """Sized for the built-in tiny model (a few minutes on 2 CPU cores); the config_hub YAMLs hold the paper's."""
    return TrainArgs(
        save_interval=100, log_interval=1, global_batch_size=16, micro_batch_size=4, lr_warmup_steps=10,
        epochs=None, max_steps=200, max_seq_length=None, min_lr=0.0,
    )


def default_eval_args() -> EvalArgs:
    return EvalArgs(interval=50, max_new_tokens=50, max_iters=20)


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


def run(method: Method, opts: Options) -> None:
    """Check the options (every refusal before anything starts), resolve the defaults and launch `main`."""
    check_args(opts.train, opts.dropbp, opts.pld, opts.devices, opts.num_nodes)
    if opts.compile and opts.devices * opts.num_nodes != 1:
        raise UsageError("--compile true runs on one device (--devices 1): it is not tested with DDP or FSDP")
    builtin_model = opts.checkpoint_dir is None
    checkpoint_dir = resolve_checkpoint_dir(opts.checkpoint_dir)
    if opts.data is None and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        print(f"No --data given: using {'the built-in data (--data Builtin)' if builtin_model else 'Alpaca'}")
    data = (Builtin() if builtin_model else Alpaca()) if opts.data is None else opts.data
    opts = replace(opts, checkpoint_dir=checkpoint_dir, data=data, out_dir=Path(opts.out_dir).expanduser().resolve())
    if opts.out_dir.exists() and not opts.out_dir.is_dir():  # the claim would fail with a raw FileExistsError
        raise UsageError(f"--out_dir {opts.out_dir} exists and is not a directory")
    record = run_record(method, opts)
    fabric_args, quantize_base = launch_plan(method, opts.precision, opts.devices, opts.num_nodes)
    unsupported = compile_unsupported(quantized_on_cpu=quantize_base is not None) if opts.compile else None
    if unsupported:
        raise UsageError(f"--compile true does not work with {unsupported}")
    config = method.config(checkpoint_dir)
    if opts.train.max_seq_length is not None and opts.train.max_seq_length > config.block_size:
        raise UsageError(
            f"--train.max_seq_length {opts.train.max_seq_length} is above the model's block size {config.block_size}"
        )
    logger = choose_logger(opts.logger_name, opts.out_dir, name=f"finetune-{method.name}-{config.name}",
                           log_interval=1)
    fabric = L.Fabric(**fabric_args, loggers=logger)
    fabric.launch(main, method, opts, config, quantize_base, record)


def main(fabric: L.Fabric, method: Method, opts: Options, config: Config,
         quantize_base: Optional[Callable[[torch.nn.Module], torch.nn.Module]], record: dict) -> None:
    problem, claim = claim_out_dir(opts.out_dir, opts.resume, opts.overwrite) if fabric.global_rank == 0 else (None,
                                                                                                                None)
    problem = fabric.broadcast(problem, src=0)
    if problem:
        raise UsageError(problem)
    try:
        with stop_signals(fabric.world_size):  # Ctrl-C and SIGTERM save the last completed step (see loop.fit)
            train_in(fabric, method, opts, config, quantize_base, record)
    finally:
        if claim is not None:
            claim.release()


def train_in(fabric: L.Fabric, method: Method, opts: Options, config: Config, quantize_base, record: dict) -> None:
    """Everything of a run once its out_dir is claimed (`main` releases the claim however this ends)."""
    if opts.resume in (True, "auto") and finished_run(opts.out_dir, record):  # a preempted job's restart, too late
        fabric.print(f"--resume auto: {opts.out_dir} holds a finished run (final/): nothing to do")
        return
    resume_path = find_resume_path(opts.out_dir, opts.resume, fabric.print)
    fabric.seed_everything(opts.seed)  # before the dataloaders: Fabric's DistributedSampler seeds its shuffling from it
    tokenizer, example = set_up_data(fabric, opts, config)
    train_loader, val_loader = fabric.setup_dataloaders(opts.data.train_dataloader(), opts.data.val_dataloader())
    accum = opts.train.global_batch_size // (opts.train.micro_batch_size * fabric.world_size)
    steps_per_epoch = max(1, len(train_loader) // accum)
    max_steps = min(opts.train.max_steps or math.inf, (opts.train.epochs or math.inf) * steps_per_epoch)
    warmup = math.ceil(opts.train.lr_warmup_fraction * steps_per_epoch) if opts.train.lr_warmup_fraction else (
        opts.train.lr_warmup_steps or 0)  # litgpt: a fraction of an epoch, or a number of optimizer steps
    model, handler, pld_handler = build_model(fabric, method, opts, config, quantize_base, max_steps)
    optimizer = instantiate_torch_optimizer(opts.optimizer, param_groups(handler, [p for p in model.parameters()
                                                                                   if p.requires_grad]))
    optimizer = fabric.setup_optimizers(optimizer)
    compensate_lr(optimizer, handler, enabled=opts.dropbp.lr_compensation, accum=accum)
    base_lr = optimizer.param_groups[0]["lr"]  # the schedule's peak; read before a resumed state overwrites it
    run = Run(fabric, method, model, optimizer, handler, pld_handler, train_loader, val_loader, opts.train, opts.eval,
              opts.dropbp, opts.out_dir, accum, max_steps, warmup, base_lr, example, record)
    restored_rng = resume_from(run, resume_path) if resume_path is not None else None

    if opts.eval.initial_validation and resume_path is None:  # as litgpt: the whole validation set, before training
        log_validation(run, "Initial", step=0)
    else:  # a quick check that validation works, so a problem shows now and not after training
        validate(fabric, model, val_loader, 2, pld_handler)
    if fabric.global_rank == 0:  # also marks the run as started: see Claim.release
        write_record(record, opts.out_dir)
    before = weight_fingerprints(fabric, model)
    fit(run, restored_rng)
    report_moved(fabric, before, weight_fingerprints(fabric, model))

    # the model is saved before the final validation, so that nothing trained is lost to an error there
    final_dir = opts.out_dir / "final"
    if fabric.global_rank == 0:
        final_dir.mkdir(parents=True, exist_ok=True)
    fabric.barrier()
    method.finalize(fabric, model, opts.checkpoint_dir, final_dir)
    if fabric.global_rank == 0:
        copy_config_files(opts.checkpoint_dir, final_dir)
        save_prompt_style(opts.data.prompt_style, final_dir)
        write_record(record, final_dir)
    fabric.barrier()
    fabric.print(f"Saved the fine-tuned model to {final_dir}")
    if opts.eval.final_validation:
        log_validation(run, "Final", step=run.progress["step"])


def set_up_data(fabric: L.Fabric, opts: Options, config: Config) -> tuple:
    """Connect, download (rank 0 first), check and split the data; returns the tokenizer and the sample answer's
    `Example` (a bad ``--eval.evaluate_example`` is refused here, before any model is built)."""
    tokenizer, train, data = Tokenizer(opts.checkpoint_dir), opts.train, opts.data
    if train.max_seq_length is None:  # litgpt would pass longer samples to the model, which refuses them
        fabric.print(f"--train.max_seq_length not set: samples are cut at the model's block size, {config.block_size}"
                     " tokens")
    limit_workers(data)
    data.connect(tokenizer=tokenizer, batch_size=train.micro_batch_size,
                 max_seq_length=train.max_seq_length or config.block_size)
    with fabric.rank_zero_first():
        prepare_data(data)
    setup_data(data)
    return tokenizer, Example(tokenizer, data, opts.eval)


def build_model(fabric: L.Fabric, method: Method, opts: Options, config: Config, quantize_base, max_steps) -> tuple:
    """The method's gated model with the checkpoint's weights, set up by Fabric, and its DropBP (and PLD) handler."""
    # Skipping initialisation is only safe when the checkpoint holds every parameter (not LoRA or adapter weights).
    # Under FSDP it means the meta device: the weights are then loaded into the sharded model.
    empty_init = fabric.world_size > 1 and method.full
    load_after_setup = empty_init and isinstance(fabric.strategy, FSDPStrategy)
    with fabric.init_module(empty_init=empty_init):
        model = method.gpt_class(config)
    if not load_after_setup:
        state = load_checkpoint_file(opts.checkpoint_dir / "lit_model.pth")
        model.load_state_dict(state.get("model", state), strict=False)
    method.mark_trainable(model)
    if quantize_base is not None:  # QLoRA on CPU: after the weights are in (4-bit state dicts differ)
        model = quantize_base(model)
    model.max_seq_length = min(opts.train.max_seq_length or config.block_size, config.block_size)
    set_gate_flops(model, model.max_seq_length)
    if opts.compile:  # the branches only: the gates decide outside the compiled code, so masks never recompile
        compile_branches(model)

    dropbp, pld = opts.dropbp, opts.pld
    handler = DropBPHandler(model, rate=dropbp.rate, sampling=dropbp.sampling,
                            seed=opts.seed if dropbp.seed is None else dropbp.seed)
    pld_handler = PLDHandler(model, pld.theta_bar, pld.gamma, seed=opts.seed, total_steps=max_steps,
                             target_drop=pld.target_drop) if pld.enabled else None
    fabric.print(
        f"Trainable parameters: {num_parameters(model, requires_grad=True):,} | frozen:"
        f" {num_parameters(model, requires_grad=False):,} | {len(handler.gates)} gated branches,"
        f" DropBP rate {dropbp.rate} ({dropbp.allocation}, {dropbp.sampling}){' + PLD' if pld.enabled else ''}"
        f"{', branches compiled' if opts.compile else ''}"
    )
    model = fabric.setup_module(model)
    if load_after_setup:
        fabric.load_raw(opts.checkpoint_dir / "lit_model.pth", model, strict=False)
    return model, handler, pld_handler


def resume_from(run: Run, path: Path) -> dict:
    """Load model, optimizer, progress and DropBP/PLD state from a checkpoint (refused if the run's options
    changed); returns the saved RNG states, which `fit` restores once the data order is replayed."""
    fabric, handler = run.fabric, run.handler
    check_complete(path, run.model)
    restored = fabric.load(path, {"model": run.model, "optimizer": run.optimizer}, strict=False, weights_only=True)
    check_resumed_options(restored.get("record"), run.record, path)
    run.progress.update(restored["progress"])
    handler.load_state_dict(restored["dropbp"])
    if run.pld_handler is not None:
        run.pld_handler.load_state_dict(restored["pld"])
    compensate_lr(run.optimizer, handler, enabled=run.dropbp.lr_compensation, accum=run.accum)
    fabric.print(f"Resumed from {path} at step {run.progress['step']}")
    return restored_rng(fabric, path, restored["rng"])


def log_validation(run: Run, which: str, step: int) -> None:
    """The whole validation set, logged at ``step`` and printed as litgpt prints it."""
    val_loss = validate(run.fabric, run.model, run.val_loader, len(run.val_loader), run.pld_handler)
    run.fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(val_loss)}, step=step)
    run.fabric.print(f"{which} evaluation | val loss: {val_loss:.3f} | val ppl: {math.exp(val_loss):.3f}")
