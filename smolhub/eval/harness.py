"""SmolHub checkpoints as lm-evaluation-harness models: `lm_eval.simple_evaluate(model=SmolHubLM(path), ...)`,
or `--model smolhub --model_args checkpoint=out/StoryLlama` once this module is imported.

Any of the five architectures, straight from its checkpoint (no export). Scoring follows the
harness's own `hf` backend (lm_eval/models/huggingface.py, HFLM) step for step, so a checkpoint and
its transformers export get the same numbers: the same tokenization of context and continuation,
the same left cropping to the context length, the same rolling windows, the same stop rules.
"""
from __future__ import annotations

import contextlib
import itertools
import warnings

import torch
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from torch.nn.attention import sdpa_kernel
from tqdm import tqdm

from smolhub.errors import UserError
from smolhub.generate import GENERATION_ATTENTION, Engine, SamplingConfig
from smolhub.inference import load_model

# gen_kwargs a task may set that greedy decoding or SamplingConfig already covers
SAMPLING_KEYS = {"do_sample", "temperature", "top_k", "top_p", "repetition_penalty"}


@register_model("smolhub")
class SmolHubLM(TemplateLM):
    """A SmolHub checkpoint (folder, run out_dir or Hub repo id) or a loaded Engine, scored by the harness.

    loglikelihood: (context + continuation) requests, longest first, batch_size per forward, each
    cropped to its last block_size tokens, right-padded (the models are causal, so padding after a
    row changes none of its logits). loglikelihood_rolling: disjoint windows of block_size tokens
    over each document, the first conditioned on EOS. generate_until: the Engine's KV-cache decoder,
    greedy unless the task samples, stopping at the task's `until` strings, EOS or max_gen_toks."""

    def __init__(self, checkpoint: str | Engine, batch_size: int | str = 8, device: str = "auto",
                 dtype: str = "auto", max_gen_toks: int = 256):
        super().__init__()
        self.engine = checkpoint if isinstance(checkpoint, Engine) else load_model(str(checkpoint), device, dtype)
        self.model = self.engine.model.eval()
        self.tokenizer = self.engine.tokenizer
        self._device = next(self.model.parameters()).device
        try:
            batch_size = int(batch_size)
        except ValueError:
            raise UserError(f"batch_size must be a whole number, got {batch_size!r}") from None
        if batch_size < 1 or max_gen_toks < 1:
            raise UserError(f"batch_size and max_gen_toks must be positive, got {batch_size} and {max_gen_toks}")
        # an expert's capacity counts every token of the forward, padding included: scored one
        # request at a time, a request's score does not depend on what it was batched with
        self.batch_size = 1 if getattr(self.model.config, "capacity_factor", 0) > 0 else batch_size
        self.max_gen_toks = max_gen_toks

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # SmolHub models train on documents separated by EOS, with no BOS to add
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def get_model_info(self) -> dict:
        """What simple_evaluate records about the model in its results' config."""
        return {"architecture": self.model.architecture, "model_num_parameters": self.model.num_params(),
                "model_dtype": str(next(self.model.parameters()).dtype),
                "checkpoint": str(self.engine.path) if self.engine.path else None}

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(request strings or None, context ids, continuation ids) -> (log-probability, is greedy) each."""
        # requests sharing context + continuation[:-1] (the choices of a one-token answer) share one forward
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                            group_by="contexts", group_fn=lambda r: r[1] + r[2][:-1])
        results = []
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        for chunk in collator.get_batched(n=self.batch_size):
            if any(len(continuation) > self.max_length for _, _, continuation in chunk):
                raise UserError(f"a task's answer is longer than the model's context of {self.max_length} tokens, "
                                "so it cannot be scored: leave that task out")
            # the last token is only predicted; a window longer than the context keeps its end
            windows = [(context + continuation)[-(self.max_length + 1):][:-1] for _, context, continuation in chunk]
            width = max(len(w) for w in windows)
            batch = torch.tensor([w + [0] * (width - len(w)) for w in windows], device=self._device)
            with sdpa_kernel(GENERATION_ATTENTION):  # batches of ever new lengths: no per-shape kernel plans
                logits = self.model(batch)[0]
            for (request, context, continuation), window, row in zip(chunk, windows, logits):
                scored = row[len(window) - len(continuation):len(window)].float().log_softmax(dim=-1)[None]
                greedy = scored.argmax(dim=-1)
                for key, target, logprobs in collator.get_cache(req_str=request, cxt_toks=context,
                                                               cont_toks=continuation, logits=scored):
                    target = torch.tensor(target, device=self._device)[None]
                    answer = (float(logprobs[:, -target.size(1):].gather(2, target[..., None]).sum()),
                              bool((greedy[:, -target.size(1):] == target).all()))
                    results.append(answer)
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, answer)
                    progress.update(1)
        progress.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's total log-probability, every token predicted once from up to block_size tokens."""
        windows, owners = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each (context, gen_kwargs) request's continuation, cut before the first stop string."""
        collator = Collator([r.args for r in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                            group_by="gen_kwargs", group_fn=lambda r: r[1])
        eos = self.tokenizer.decode([self.eot_token_id])
        results = []
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            cfg = self._sampling(kwargs, max_gen_toks)
            # HFLM keeps room in the context for the whole generation; a generation as long as the
            # context or longer keeps the last half of the context, and the window slides
            keep = self.max_length - max_gen_toks if max_gen_toks < self.max_length else self.max_length // 2
            prompts = [(self.tok_encode(c) or [self.prefix_token_id])[-keep:] for c in contexts]
            # the decoder takes rows of one length; the chunk is sorted by length
            for _, run in itertools.groupby(range(len(prompts)), key=lambda i: len(prompts[i])):
                run = list(run)
                for i, text in zip(run, self._generate([prompts[i] for i in run], cfg, until)):
                    results.append(text)
                    self.cache_hook.add_partial("generate_until", chunk[i], text)
                    progress.update(1)
        progress.close()
        return collator.get_original(results)

    def _sampling(self, kwargs: dict, max_gen_toks: int) -> SamplingConfig:
        ignored = sorted(set(kwargs) - SAMPLING_KEYS)
        if ignored:
            warnings.warn(f"generation settings {ignored} have no SmolHub equivalent and are ignored")
        return SamplingConfig(max_new_tokens=max_gen_toks,
                              temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                              top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0),
                              repetition_penalty=float(kwargs.get("repetition_penalty") or 1.0))

    def _generate(self, prompts: list[list[int]], cfg: SamplingConfig, until: list[str]) -> list[str]:
        """Decode equal-length prompts together until every row has met a stop string, EOS or max_new_tokens."""
        rows: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        steps = self.engine.generate_ids(torch.tensor(prompts, device=self._device), cfg, self.eot_token_id,
                                         len(self.tokenizer))
        with contextlib.closing(steps):  # stopping early hands the decoder back at once
            for step in steps:
                for i, token in enumerate(step.tolist()):
                    if done[i]:
                        continue
                    if token == self.eot_token_id:
                        done[i] = True
                        continue
                    rows[i].append(token)
                    text = self.tokenizer.decode(rows[i])
                    done[i] = any(stop and stop in text for stop in until)
                if all(done):
                    break
        return [postprocess_generated_text(self.tokenizer.decode(row, skip_special_tokens=True), until, None)
                for row in rows]

