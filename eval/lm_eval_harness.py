"""An lm-evaluation-harness model that runs a Lit-GPT checkpoint directly (no conversion to Hugging Face).

    lm = LitGPTLM.from_checkpoint(Path("out/lora/final"), batch_size=8, device="cuda")
    lm_eval.simple_evaluate(model=lm, tasks=["piqa"])

The model is ``lit_gpt.model.GPT`` (litgpt's GPT with DropBP gates; in eval nothing is dropped, so it scores
exactly like litgpt's model) and the tokenizer is litgpt's, which adds a BOS token when the checkpoint's
tokenizer config asks for one, as litgpt does for training and generation.
"""

from pathlib import Path
from typing import Optional

import torch
from litgpt.config import Config
from litgpt.generate.base import generate_fn
from litgpt.tokenizer import Tokenizer
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from lit_gpt.model import GPT

ADAPTER_FILE = "lit_model.pth.adapter_v2"
PRECISIONS = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}


class CheckpointError(Exception):
    """A checkpoint directory that cannot be evaluated; the message says what is wrong and what to do."""


def check_checkpoint_dir(checkpoint_dir: Path) -> None:
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {checkpoint_dir}")
    if not (checkpoint_dir / "lit_model.pth").is_file() and (checkpoint_dir / "lit_model.pth.lora").is_file():
        raise CheckpointError(
            f"{checkpoint_dir} holds LoRA weights only (lit_model.pth.lora, no lit_model.pth): merge them into the"
            f" base model first (`litgpt merge_lora {checkpoint_dir}`) or point --checkpoint_dir to the fine-tuning"
            " run's final/ directory, which holds the merged model"
        )
    expected = {
        "lit_model.pth": ["lit_model.pth"],
        "model_config.yaml": ["model_config.yaml"],
        "tokenizer.json or tokenizer.model": ["tokenizer.json", "tokenizer.model"],
    }
    missing = [label for label, names in expected.items() if not any((checkpoint_dir / n).is_file() for n in names)]
    if missing:
        raise CheckpointError(f"{checkpoint_dir} is not a Lit-GPT checkpoint directory: missing {', '.join(missing)}")


def default_precision(device: str) -> str:
    if device.startswith("cuda"):
        return "bf16-true" if torch.cuda.is_bf16_supported() else "16-true"
    return "32-true"


def load_model(checkpoint_dir: Path, device: torch.device, dtype: torch.dtype) -> GPT:
    """litgpt's GPT from ``lit_model.pth``; with ``lit_model.pth.adapter_v2`` beside it (an adapter run's
    ``final/``), the adapter-v2 GPT with those weights added, as litgpt's adapter generation loads it."""
    adapter = checkpoint_dir / ADAPTER_FILE
    if adapter.is_file():
        import lit_gpt.adapter_v2

        config_class, gpt_class = lit_gpt.adapter_v2.Config, lit_gpt.adapter_v2.GPT
    else:
        config_class, gpt_class = Config, GPT
    config = config_class.from_file(checkpoint_dir / "model_config.yaml")
    # build without memory, then allocate every weight once, directly on the device and in the target dtype
    with torch.device("meta"):
        model = gpt_class(config)
    model = model.to(dtype).to_empty(device=device)
    state_dict = {}
    for path in [checkpoint_dir / "lit_model.pth"] + ([adapter] if adapter.is_file() else []):
        try:  # memory-mapped: read from disk as load_state_dict copies each weight to the device
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            state_dict.update(state.get("model", state))
        except Exception as e:  # a torn zip, a truncated or foreign pickle, ...
            raise CheckpointError(f"{path} cannot be read as a litgpt checkpoint ({type(e).__name__}): re-download"
                                  " or re-convert it, or re-run the fine-tuning that wrote it") from None
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{checkpoint_dir / 'lit_model.pth'} does not fit model_config.yaml: {len(missing)} weights missing and"
            f" {len(unexpected)} unexpected (e.g. {', '.join((missing + unexpected)[:2])}); expected litgpt's plain"
            " GPT state dict, with any LoRA weights merged in (or an adapter run's final/)"
        )
    model.reset_parameters()  # the RoPE cache is not in the state dict: compute it on the real device
    return model.to(dtype).eval()


class LitGPTLM(TemplateLM):
    """Scores with one forward pass per batch of up to ``batch_size`` sequences; generates greedily, one request at
    a time, with the KV cache."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, batch_size: int = 8, max_gen_toks: int = 256) -> None:
        super().__init__()
        if tokenizer.bos_id is None and tokenizer.eos_id is None:
            raise CheckpointError("the tokenizer defines neither a BOS nor an EOS token (see tokenizer_config.json)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self._device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(
        cls, checkpoint_dir: Path, batch_size: int = 8, device: str = "cpu", precision: Optional[str] = None
    ) -> "LitGPTLM":
        check_checkpoint_dir(checkpoint_dir)
        precision = precision or default_precision(device)
        model = load_model(checkpoint_dir, torch.device(device), PRECISIONS[precision])
        return cls(model, Tokenizer(checkpoint_dir), batch_size=batch_size)

    @property
    def max_length(self) -> int:
        return self.model.max_seq_length

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # what an empty context (and each rolling document) is conditioned on
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        # None: litgpt's own choice from the tokenizer config; lm-eval passes False where it adds the prefix itself
        bos = False if add_special_tokens is False else None
        return self.tokenizer.encode(string, bos=bos).tolist()

    def get_model_info(self) -> dict:
        return {"model_name": self.model.config.name, "dtype": str(next(self.model.parameters()).dtype)}

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Each request is ``(strings, context_tokens, continuation_tokens)``; returns the summed log-probability of
        the continuation and whether greedy decoding would have produced it."""
        # longest first: a batch holds sequences of similar length (little padding) and running out of memory
        # shows up on the first batch
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        results = [None] * len(requests)
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="loglikelihood"):
            batch = order[start : start + self.batch_size]
            inputs, targets = [], []
            for i in batch:
                _, context, continuation = requests[i]
                tokens = (context + continuation)[-(self.max_length + 1) :]  # keep the end when too long
                n_scored = min(len(continuation), len(tokens) - 1)
                inputs.append(tokens[:-1])
                targets.append(tokens[len(tokens) - n_scored :])
            # pad on the right: with a causal mask, padding never changes the logits of the tokens before it
            x = torch.zeros(len(batch), max(map(len, inputs)), dtype=torch.long)
            for row, tokens in enumerate(inputs):
                x[row, : len(tokens)] = torch.tensor(tokens)
            logits = self.model(x.to(self.device))
            for row, i in enumerate(batch):
                end = len(inputs[row])
                target = torch.tensor(targets[row], device=self.device)
                logprobs = logits[row, end - len(target) : end].float().log_softmax(dim=-1)
                logprob = logprobs.gather(-1, target[:, None]).sum().item()
                is_greedy = bool((logprobs.argmax(dim=-1) == target).all())
                results[i] = (logprob, is_greedy)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents: each is cut into windows of ``max_length`` tokens, every token is
        scored once, and a document's windows go through the same batches as everybody else's."""
        windows, owners = [], []
        for doc_idx, request in enumerate(requests):
            (text,) = request.args
            tokens = self.tok_encode(text, add_special_tokens=False)
            rolling = get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1)
            for context, target in map(make_disjoint_window, rolling):
                windows.append(((text, ""), context, target))
                owners.append(doc_idx)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding; sampling settings in a task's generation_kwargs are ignored."""
        outputs = []
        for request in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else until
            outputs.append(self.generate(context, until, gen_kwargs.get("max_gen_toks", self.max_gen_toks)))
        return outputs

    @torch.inference_mode()
    def generate(self, context: str, until: list[str], max_new_tokens: int) -> str:
        """Greedy continuation of ``context``, cut before the first stop string, at EOS or after max_new_tokens."""
        if self.model.mask_cache is None:
            dtype = next(self.model.parameters()).dtype
            self.model.set_kv_cache(batch_size=1, device=self.device, dtype=dtype)
        max_new_tokens = min(max_new_tokens, self.max_length - 1)
        # the prompt keeps its end when it does not fit next to the new tokens
        prompt = self.tok_encode(context)[-(self.max_length - max_new_tokens) :] or [self.prefix_token_id]
        stops = [stop for stop in until if stop]
        eos = ([self.tokenizer.eos_id],) if self.tokenizer.eos_id is not None else ()
        new_tokens, text = [], ""
        for token in generate_fn(
            self.model,
            torch.tensor(prompt, device=self.device),
            len(prompt) + max_new_tokens,
            temperature=0.0,
            stop_tokens=eos,
            include_prompt=False,
            include_eos=False,
        ):
            new_tokens.append(token)
            # stop strings need not fall on token boundaries: look for them in the decoded text
            text = self.tokenizer.decode(torch.cat(new_tokens))
            if any(stop in text for stop in stops):
                break
        for stop in stops:
            text = text.split(stop)[0]
        return text
