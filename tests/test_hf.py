"""DropBP on Hugging Face Transformers models (+ PEFT) and the Trainer: dropbp/integrations/transformers.py.

Offline: tiny random-init configs of each supported family, the project's built-in data and tokenizer.
"""

import copy
import math

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra is not installed (pip install -e '.[hf]')")
pytest.importorskip("peft", reason="the hf extra is not installed (pip install -e '.[hf]')")

import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from dropbp import DropBPGate, DropBPHandler  # noqa: E402
from dropbp.integrations import transformers as hf  # noqa: E402
from dropbp.integrations.transformers.layout import _qualified  # noqa: E402

COMMON = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, max_position_embeddings=64, attention_dropout=0.1,
)
FAMILIES = {  # config class, model class, extra config: one tiny model per supported family
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "sliding_window": 8}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "sliding_window": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "resid_pdrop": 0.1}),
}
# the module whose output ends each branch, per layout: detaching it by a hook is "the branch detached by hand"
BRANCH_ENDS = {
    "pre_norm": ("self_attn", "mlp"),
    "sandwich": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "phi3": ("resid_attn_dropout", "resid_mlp_dropout"),
}
MASKS = ([False] * 4, [True, False, False, True], [False, True, True, False], [True] * 4)


def tiny_model(family: str, **overrides):
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config)


def tokens(batch: int = 2, length: int = 12, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def seeded_loss(model, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(7)  # the same dropout masks in every forward
    return model(input_ids=x, labels=x).loss


def detached_reference(model: torch.nn.Module, mask: list) -> list:
    """Hooks making the unpatched ``model`` detach the output of every branch dropped in ``mask``."""
    handles = []
    for i, layer in enumerate(hf.decoder_layers(model)):
        layout = hf.SUPPORTED[_qualified(type(layer))]
        for kind, end in enumerate(BRANCH_ENDS[layout]):
            if mask[2 * i + kind]:
                def detach(module, args, out):
                    return (out[0].detach(),) + tuple(out[1:]) if isinstance(out, tuple) else out.detach()

                handles.append(getattr(layer, end).register_forward_hook(detach))
    return handles


def grads(model) -> dict:
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters() if p.requires_grad}


def check_masks(model, reference, handler, x, masks, exact: bool) -> None:
    """For each mask: the gated model's gradients against the reference with those branches detached by hand."""
    for mask in masks:
        handler.set_mask(torch.tensor(mask))
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        seeded_loss(model, x).backward()
        handles = detached_reference(reference, mask)
        seeded_loss(reference, x).backward()
        for h in handles:
            h.remove()
        compare_gradients(model, reference, handler, mask, exact=exact)


def compare_gradients(model, reference, handler, mask, exact: bool) -> None:
    """Same gradients as the reference (bitwise, or to float rounding), and None exactly for the trainable
    parameters that live only in dropped branches."""
    got, want = grads(model), grads(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] is None) == (want[name] is None), (mask, name)
        if want[name] is not None:
            same = torch.equal if exact else lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-7)
            assert same(got[name], want[name]), (mask, name)
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    dropped = {names[id(p)] for g, d in zip(handler.gates, mask) if d for p in g.branch_parameters() if id(p) in names}
    kept = {names[id(p)] for g, d in zip(handler.gates, mask) if not d for p in g.branch_parameters() if id(p) in names}
    assert {n for n, g in got.items() if g is None} == dropped - kept != set()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_bitwise_equal_and_state_dict_unchanged(family):
    model = tiny_model(family)
    x = tokens()
    plain = copy.deepcopy(model)
    keys = list(model.state_dict())
    gates = hf.install_gates(model, seq_len=12)
    assert list(model.state_dict()) == keys  # gates have no parameters or buffers
    assert [(g.kind, g.layer) for g in gates] == [("attn", 0), ("mlp", 0), ("attn", 1), ("mlp", 1)]
    assert all(type(layer).__name__ == type(p).__name__ for layer, p in zip(hf.decoder_layers(model),
                                                                          hf.decoder_layers(plain)))
    handler = DropBPHandler(model)
    for training in (False, True):  # train mode: dropout on, same RNG draws in the same order
        model.train(training)
        plain.train(training)
        torch.manual_seed(3)
        ref = plain(input_ids=x).logits
        for mask in MASKS:
            handler.set_mask(torch.tensor(mask))
            torch.manual_seed(3)
            assert torch.equal(model(input_ids=x).logits, ref), (family, training, mask)
    with pytest.raises(ValueError, match="already has DropBP gates"):
        hf.install_gates(model)
    hf.remove_gates(model)
    assert type(hf.decoder_layers(model)[0]) is type(hf.decoder_layers(plain)[0])
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradients_equal_detached_reference(family):
    """Full fine-tuning: each parameter's gradient equals the unpatched model's with the dropped branches' outputs
    detached by hand; parameters only in dropped branches get None, every other parameter a gradient."""
    reference = tiny_model(family).train()
    model = copy.deepcopy(reference)
    hf.install_gates(model)
    handler = DropBPHandler(model)
    x = tokens()
    check_masks(model, reference, handler, x, MASKS[1:], exact=True)


@pytest.mark.parametrize("family,reentrant", [("llama", False), ("llama", True), ("gemma2", False), ("phi3", False)])
def test_peft_lora_with_gradient_checkpointing(family, reentrant):
    """Gates installed before get_peft_model, gradient checkpointing on (the forward recomputed in backward with the
    same decision): LoRA gradients equal the detached reference's; LoRA weights of dropped branches get None."""
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "qkv_proj",
                                                                          "down_proj"])
    base = tiny_model(family, attention_dropout=0.0, **({"resid_pdrop": 0.0} if family == "phi3" else {}))
    torch.manual_seed(1)
    reference = get_peft_model(copy.deepcopy(base), lora).train()
    model = copy.deepcopy(base)
    hf.install_gates(model)
    torch.manual_seed(1)
    model = get_peft_model(model, lora).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert all(layer.gradient_checkpointing for layer in hf.decoder_layers(model))
    keys = [k for k in reference.state_dict()]
    assert list(model.state_dict()) == keys
    handler = DropBPHandler(model)
    assert all(any("lora_" in n for n, _ in g.branch_modules[1].named_parameters()) for g in handler.gates)
    x = tokens()
    check_masks(model, reference, handler, x, MASKS[1:3], exact=False)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_dropped_branches_keep_no_activations(family):
    """Bytes saved for backward (parameters excluded) are additive over the kept branches: a dropped branch keeps
    nothing, and p = 0 saves exactly what the unpatched model saves."""
    model = tiny_model(family).train()
    plain = copy.deepcopy(model)
    hf.install_gates(model)
    handler = DropBPHandler(model)
    x = tokens(2, 16)

    def saved_bytes(m) -> int:
        params = {p.untyped_storage().data_ptr() for p in m.parameters()}
        total = 0

        def pack(t):
            nonlocal total
            if t.untyped_storage().data_ptr() not in params:
                total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            seeded_loss(m, x)
        return total

    def with_mask(mask) -> int:
        handler.set_mask(torch.tensor(mask))
        return saved_bytes(model)

    none, everything = with_mask([False] * 4), with_mask([True] * 4)
    assert none == saved_bytes(plain)
    assert everything < none / 3  # what is left: embedding, final norm, head, loss
    single = [with_mask([j != i for j in range(4)]) - everything for i in range(4)]
    assert all(s > 0 for s in single)
    for mask in MASKS:
        kept = sum(s for s, d in zip(single, mask) if not d)
        assert with_mask(mask) - everything == kept


def test_unsupported_layer_class_is_named(monkeypatch):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(TypeError, match="GPT2Block"):
        hf.install_gates(gpt2)
    with pytest.raises(ValueError, match="no decoder layer"):
        hf.install_gates(torch.nn.Linear(2, 2))

    class CustomLayer(transformers.models.llama.modeling_llama.LlamaDecoderLayer):
        def forward(self, hidden_states, **kwargs):
            return super().forward(hidden_states, **kwargs) * 2

    model = tiny_model("llama")
    model.model.layers[1].__class__ = CustomLayer
    with pytest.raises(TypeError, match="CustomLayer"):
        hf.install_gates(model)
    assert type(model.model.layers[0]) is transformers.models.llama.modeling_llama.LlamaDecoderLayer  # untouched
    # declared with a layout its forward does not have: refused, with the difference shown
    monkeypatch.setitem(hf.SUPPORTED, _qualified(CustomLayer), "pre_norm")
    with pytest.raises(TypeError, match="is not the 'pre_norm' layout"):
        hf.install_gates(model)


def test_a_transformers_model_without_gates_is_told_to_install_them():
    from dropbp import PLDHandler

    model = tiny_model("llama")
    for ungated in (model, get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))):
        for handler, name in ((DropBPHandler, "DropBP"), (PLDHandler, "PLD")):
            with pytest.raises(ValueError, match=r"^the model has no DropBPGate: call dropbp\.integrations\."
                               rf"transformers\.install_gates\(model\) before using {name}$"):
                handler(ungated)


def test_gated_model_pickles_deep_copies_and_saves(tmp_path):
    """torch.save(model) of a gated model, loaded where the gated class does not exist yet; deepcopy; and
    remove_gates gives back the original classes."""
    from dropbp.integrations.transformers import layers

    model = tiny_model("llama", attention_dropout=0.0)
    hf.install_gates(model)
    x = tokens()
    torch.save(model, tmp_path / "model.pt")
    layers._GATED_CLASSES.clear()  # as in a fresh process: the class is rebuilt from the layer's own class
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    for copy_ in (loaded, copy.deepcopy(model)):
        layer = copy_.model.layers[0]
        assert type(layer) is hf.gated_class(transformers.models.llama.modeling_llama.LlamaDecoderLayer)
        gate = getattr(layer, hf.ATTN_GATE)
        assert gate.branch_modules[1] is layer.self_attn  # the gate still holds this copy's branch
        handler = DropBPHandler(copy_, rate=0.5, seed=0)
        handler.set_mask(torch.tensor([True, False, False, True]))
        assert torch.equal(copy_(input_ids=x).logits, model(input_ids=x).logits)
        seeded_loss(copy_, x).backward()
        assert layer.self_attn.q_proj.weight.grad is None and layer.mlp.up_proj.weight.grad is not None
    hf.remove_gates(loaded)
    assert type(loaded.model.layers[0]) is transformers.models.llama.modeling_llama.LlamaDecoderLayer
    assert not any(isinstance(m, DropBPGate) for m in loaded.modules())
    torch.save(loaded, tmp_path / "plain.pt")
    assert loaded.state_dict().keys() == model.state_dict().keys()


def test_build_gated_llama_for_benchmarks():
    """The benchmark's Transformers model (scripts/bench_hf_model.py): the same weights gated or not, FLOPs weights
    equal to litgpt's for the shape."""
    pytest.importorskip("litgpt", reason="compares with litgpt's FLOPs: the fork's environment only")
    from litgpt import Config

    from dropbp.flops import branch_flops
    from scripts.bench_hf_model import LlamaShape, build_gated_llama

    shape = LlamaShape(n_layer=2, n_embd=64, n_head=4, vocab_size=256, seq_len=32)
    for method in ("full", "lora"):
        model, handler = build_gated_llama(shape, method=method, rate=0.5)
        plain, none = build_gated_llama(shape, method=method, gated=False)
        assert none is None and len(handler.gates) == 4
        state, plain_state = model.state_dict(), plain.state_dict()
        assert state.keys() == plain_state.keys() and all(torch.equal(state[k], plain_state[k]) for k in state)
        x = tokens(2, 32, 256)
        handler.sample()
        assert torch.equal(model(input_ids=x).logits, plain(input_ids=x).logits)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert (trainable < sum(p.numel() for p in model.parameters()) / 2) == (method == "lora")
    config = Config.from_name("Llama-2-7b-hf", n_layer=2, n_embd=64, n_head=4, n_query_groups=4, block_size=32,
                              vocab_size=256, padded_vocab_size=256, intermediate_size=128)
    assert handler.flops.tolist() == branch_flops(config, 32)


# ----------------------------------------------------------------------------------------------------- Trainer
def synthetic_data(n: int = 160, vocab: int = 128, seed: int = 0):
    """Instruction-like samples without a tokenizer (this file runs without litgpt): a prompt of random tokens and,
    as the answer, the prompt's first half reversed; prompt labels -100, lengths vary, so batches are padded."""
    g = torch.Generator().manual_seed(seed)
    bos, eos, samples = 1, 2, []
    for _ in range(n):
        prompt = torch.randint(3, vocab, (int(torch.randint(6, 40, (1,), generator=g)),), generator=g).tolist()
        answer = prompt[: len(prompt) // 2][::-1] + [eos]
        samples.append({"input_ids": [bos] + prompt + answer, "labels": [-100] * (len(prompt) + 1) + answer})

    def collate(batch):
        width = max(len(s["input_ids"]) for s in batch)
        pad = lambda seq, v: seq + [v] * (width - len(seq))  # noqa: E731
        return {
            "input_ids": torch.tensor([pad(s["input_ids"], eos) for s in batch]),
            "attention_mask": torch.tensor([pad([1] * len(s["input_ids"]), 0) for s in batch]),
            "labels": torch.tensor([pad(s["labels"], -100) for s in batch]),
        }

    return samples, collate, vocab


class RecordingHandler(DropBPHandler):
    def __init__(self, *args, force_all_dropped: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.masks, self.force = [], force_all_dropped

    def sample(self):
        mask = torch.ones(len(self.gates), dtype=torch.bool) if self.force else super().sample()
        self.set_mask(mask)
        self.masks.append(mask.tolist())
        return mask


def lora_trainer(tmp_path, max_steps, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                 "up_proj", "down_proj"), force_all_dropped=False, **args):
    data, collate, vocab = synthetic_data()
    model = tiny_model("llama", vocab_size=vocab, max_position_embeddings=128, attention_dropout=0.0,
                       num_hidden_layers=8)
    hf.install_gates(model)
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=list(target_modules)))
    handler = RecordingHandler(model, rate=0.875, sampling="fixed", seed=3, force_all_dropped=force_all_dropped)
    callback = hf.DropBPCallback(handler, sensitivity_at=0.2, probe_batch_size=4)
    training_args = TrainingArguments(**{
        "output_dir": str(tmp_path), "max_steps": max_steps, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2, "learning_rate": 1e-2, "logging_steps": 1, "save_strategy": "no",
        "report_to": [], "use_cpu": True, "seed": 0, "disable_tqdm": True, **args,
    })
    trainer = Trainer(model=model, args=training_args, train_dataset=data, data_collator=collate,
                      callbacks=[callback])
    return trainer, handler, callback


def test_trainer_lora_p0875(tmp_path):
    """PEFT LoRA at p = 0.875 with gradient accumulation and gradient checkpointing."""
    trainer, handler, callback = lora_trainer(tmp_path, max_steps=5, gradient_checkpointing=True)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    lora_b = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    at_forward, training_step = [], trainer.training_step

    def recording_step(*args, **kwargs):
        at_forward.append(handler.mask.tolist())
        return training_step(*args, **kwargs)

    trainer.training_step = recording_step
    trainer.train()
    assert all(layer.gradient_checkpointing for layer in hf.decoder_layers(trainer.model))
    assert len(handler.masks) == 5 * 2  # a fresh mask before every micro-batch, accumulation included
    assert at_forward == handler.masks  # each drawn before its micro-batch's forward and backward
    assert len({tuple(m) for m in handler.masks}) > 1
    assert all(sum(m[0::2]) == 7 and sum(m[1::2]) == 7 for m in handler.masks[:2])  # fixed: 1 of 8 kept per kind
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 5 and all(math.isfinite(e["loss"]) and 0.0 <= e["drop_rate"] < 1.0 for e in logs)
    assert logs[0]["drop_rate"] == pytest.approx(0.875)
    # the sensitivity pass ran after step 1 of 5 and re-allocated the rates to the target
    assert handler.allocated and callback.report["step"] == 1
    assert handler.mean_rate == pytest.approx(0.875, abs=0.1) and len(set(handler.rates.tolist())) > 1
    assert (tmp_path / "dropbp_allocation.json").is_file()
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.model.named_parameters() if not p.requires_grad)
    moved = [n for n, p in trainer.model.named_parameters() if n in lora_b and not torch.equal(p, lora_b[n])]
    assert len(moved) > len(lora_b) / 2, (len(moved), len(lora_b))  # trained (a branch may stay dropped all run)
    assert not handler.mask.any()  # after training: every layer's own forward again


def test_trainer_step_with_nothing_trainable_kept(tmp_path):
    """LoRA on one layer's attention only, every branch dropped: the Trainer's backward must not fail, and no
    parameter may move."""
    trainer, handler, _ = lora_trainer(tmp_path, max_steps=2, target_modules=("layers.0.self_attn.q_proj",),
                                       force_all_dropped=True, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert len(handler.masks) == 4
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


def test_trainer_resume_gives_same_masks_and_losses(tmp_path):
    full, handler_full, _ = lora_trainer(tmp_path / "a", max_steps=6, save_strategy="steps", save_steps=3)
    full.train()
    # the trained PEFT model with its gates saves whole (with gradient checkpointing it would not, gates or not:
    # Transformers' enable_input_require_grads hook is a local function)
    torch.save(full.model, tmp_path / "model.pt")
    interrupted, _, _ = lora_trainer(tmp_path / "b", max_steps=6, save_strategy="steps", save_steps=3)
    resumed, handler_resumed, callback = lora_trainer(tmp_path / "b", max_steps=6)
    # the first run stops after its checkpoint at step 3
    interrupted.add_callback(type("Stop", (transformers.TrainerCallback,), {
        "on_step_end": lambda self, a, s, c, **k: setattr(c, "should_training_stop", s.global_step >= 3)})())
    interrupted.train()
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    assert handler_resumed.masks == handler_full.masks[6:]
    assert handler_resumed.rates.tolist() == handler_full.rates.tolist() and callback.report["step"] == 1
    losses = lambda t: [(e["step"], e["loss"], e["drop_rate"]) for e in t.state.log_history if "loss" in e]  # noqa
    assert losses(resumed)[-3:] == losses(full)[3:]


def test_benchmark_framework_hf_rows_side_by_side_with_the_unpatched_model(capsys):
    """`scripts/benchmark.py --framework hf`: the Table 5 rows of a gated Transformers LLaMA and its unpatched twin."""
    pytest.importorskip("litgpt", reason="the fork's benchmark: the fork's environment only")
    from scripts import benchmark

    rows = benchmark.main(framework="hf", methods=("full", "lora"), rates=(0.0, 0.875), n_layer=2, n_embd=64,
                          vocab_size=128, seq_len=16, micro_batch_size=2, steps=1, warmup=0, threads=1)
    assert {r["framework"] for r in rows} == {"hf"}
    for method in ("full", "lora"):
        variants = [r["variant"] for r in rows if r["method"] == method]
        assert variants == [0.0, 0.875, "all", "plain"]  # no PLD: its skipping is litgpt-only
        ours = next(r for r in rows if r["method"] == method and r["variant"] == 0.875)
        assert ours["saved_bytes_ratio"] < 0.5  # the gates really drop (fixed sampling: 1 of 2 branches kept at most)
    assert "gated model at p=0 vs the unpatched Transformers model" in capsys.readouterr().out
