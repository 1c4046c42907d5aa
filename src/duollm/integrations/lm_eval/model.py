"""lm-evaluation-harness model ``duollm``: evaluate a run (or an exported folder) under any routing policy.

    python -m duollm.integrations.lm_eval.model --model duollm --model_args run=RUN,policy=SSSSBBBBSSSS --tasks duollm_ppl

``python -m duollm.integrations.lm_eval.model`` is lm-eval's own command line with two additions: it imports
this module (lm-eval discovers no plugins, so ``--model duollm`` exists only once it is
imported) and, unless ``--include_path`` is given, includes the shipped tasks
(``duollm.integrations.lm_eval.tasks.TASKS_DIR``). From
Python, ``import duollm.integrations.lm_eval.model`` and call ``lm_eval.simple_evaluate(model="duollm", ...)``.

Model arguments (``--model_args k=v,...``):
    run=RUN | pretrained=FOLDER   a run folder, or a folder written by ``duollm export``
    policy=SPEC                   all-big (default; an export: its saved routing), all-small, a pattern,
                                  random:P, router:NAME
    seed=N                        seed of random routing (default 0)
    max_length=N                  scoring window (default: the run's train.seq_len, the window `duollm eval` uses)
    prefix=auto|none|eot          what the first token of a rolling document is conditioned on: ``none`` scores
                                  it not at all (it is context, as in ``duollm eval``), ``eot`` conditions it on
                                  the end-of-text token; ``auto``: BOS if the tokenizer has one, else none
    batch_size, device            as usual

Rolling log-likelihood (perplexity tasks) uses lm-eval's disjoint windows of ``max_length``
predictions. Without a prefix token they are exactly the canonical evaluation windows of
``duollm eval`` over the document (consecutive ``train.seq_len`` windows, each predicting the
token after each position), so ``token_perplexity`` of a document equals the ``duollm eval``
perplexity of the same text when its token count is a multiple of the window plus one; lm-eval
also scores a last partial window, which ``duollm eval`` drops.

Tensor name legend: B batch of windows, T positions, V vocabulary.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lm_eval.models  # noqa: F401  (lm-eval's own models: registering ours first would hide them, e.g. --model hf)
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from ...checkpoint import load_model
from ...data.cache import load_tokenizer
from ...data.corpus import EOS
from ...inference.generate import generate_ids
from ...model.routing import RandomPolicy
from ...routers.store import routing_policy


class RollingLogLikelihood(float):
    """A document's log-likelihood (the float lm-eval expects) that also says how many tokens it scored,
    so the ``duollm_ppl`` task can report per-token perplexity next to word and byte perplexity."""

    def __new__(cls, value: float, tokens: int):
        obj = super().__new__(cls, value)
        obj.tokens = tokens
        return obj

    def __reduce__(self):  # lm-eval's request cache pickles results
        return (RollingLogLikelihood, (float(self), self.tokens))


class _Tokenizer:
    """encode / decode / special ids over a run's tokenizer or an exported folder's transformers tokenizer."""

    def __init__(self, run: Path | None, pretrained: Path | None):
        if run is not None:
            tok = load_tokenizer(run)
            self._encode, self._decode = tok.encode, tok.decode
            if tok.kind == "bpe":
                self.eot_id, self.bos_id = tok.backend.token_to_id(EOS), None
            else:
                self.eot_id, self.bos_id = tok.backend.eos_token_id, tok.backend.bos_token_id
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(pretrained))
            self._encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]
            self._decode = lambda ids: tok.decode(ids)
            self.eot_id, self.bos_id = tok.eos_token_id, tok.bos_token_id

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def decode(self, ids) -> str:
        return self._decode(list(ids))


@register_model("duollm")
class DuoLM(TemplateLM):
    def __init__(
        self,
        run: str | None = None,
        pretrained: str | None = None,
        policy: str | None = None,
        seed: int = 0,
        max_length: int | None = None,
        prefix: str = "auto",
        batch_size: int | str | None = 16,
        device: str | None = None,
        **kwargs,
    ):
        super().__init__()
        if (run is None) == (pretrained is None):
            raise ValueError("duollm model needs exactly one of run=RUN or pretrained=FOLDER in --model_args")
        unknown = sorted(k for k in kwargs if k not in ("trust_remote_code", "dtype"))
        if unknown:
            raise ValueError(f"unknown duollm model argument(s): {', '.join(unknown)}")
        device = str(device or "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval's command line asks for cuda:0 by default; like its hf model, fall back
        self._device = torch.device(device)
        root = Path(run or pretrained)
        if run is not None:
            self.model, cfg = load_model(root, self._device)
            window = cfg.train.seq_len
        else:
            import yaml

            from ..hf import DuoForCausalLM
            from ..hf.export import RUN_CONFIG_FILE

            hf = DuoForCausalLM.from_pretrained(str(root))
            self.model = hf.model.to(self._device).eval()
            window = self.model.cfg.max_seq_len
            if (root / RUN_CONFIG_FILE).is_file():
                window = yaml.safe_load((root / RUN_CONFIG_FILE).read_text())["train"]["seq_len"]
            if policy is None:
                policy = hf.config.routing
        self.tok = _Tokenizer(Path(run) if run else None, Path(pretrained) if pretrained else None)
        self.policy_name, self.routes = routing_policy(policy, self.model.cfg.n_layers, root=root,
                                                             seed=int(seed), device=self._device)
        self._max_length = int(max_length or window)
        if not 1 <= self._max_length <= self.model.cfg.max_seq_len:
            raise ValueError(f"max_length={self._max_length} must be in 1..{self.model.cfg.max_seq_len} (model.max_seq_len)")
        if prefix not in ("auto", "none", "eot"):
            raise ValueError(f"prefix must be auto, none or eot; got {prefix!r}")
        self._rolling_prefix = {"none": None, "eot": self.tok.eot_id, "auto": self.tok.bos_id}[prefix]
        self.batch_size = 16 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)

    # --- what lm-eval asks of a model

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eot_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    def get_model_info(self) -> dict:
        return {"duollm_policy": self.policy_name, "duollm_max_length": self._max_length}

    # --- scoring

    @torch.no_grad()
    def _score(self, windows: list[tuple[list[int], list[int]]], desc: str, disable_tqdm: bool):
        """``(input_ids, targets)`` windows -> ``(sum log p(targets), all targets greedy, n)`` each.

        The targets are the last ``len(targets)`` next-token predictions of the window. Windows
        are batched longest first and right-padded: attention is causal, so padding after a
        position never changes it.
        """
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        results = [None] * len(windows)
        for b0 in tqdm(range(0, len(order), self.batch_size), desc=desc, disable=disable_tqdm, leave=False):
            batch = order[b0 : b0 + self.batch_size]
            T = max(len(windows[i][0]) for i in batch)
            idx_BT = torch.full((len(batch), T), self.eot_token_id or 0, dtype=torch.long)
            for row, i in enumerate(batch):
                inp = windows[i][0]
                idx_BT[row, : len(inp)] = torch.tensor(inp)
            logp_BTV = F.log_softmax(self.model(idx_BT.to(self._device), routes=self.routes).logits.float(), -1).cpu()
            for row, i in enumerate(batch):
                inp, tgt = windows[i]
                n = len(tgt)
                logp_TV = logp_BTV[row, len(inp) - n : len(inp)]
                tgt_T = torch.tensor(tgt)
                ll = logp_TV.gather(-1, tgt_T[:, None]).sum().item()
                results[i] = (ll, bool((logp_TV.argmax(-1) == tgt_T).all()), n)
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        windows = []
        for _, context_enc, continuation_enc in requests:
            if not continuation_enc:
                raise ValueError("lm-eval request with an empty continuation")
            whole = (context_enc + continuation_enc)[-(self._max_length + 1):]  # keep the most recent context
            n = min(len(continuation_enc), len(whole) - 1)
            windows.append((whole[:-1], whole[-n:]))
        return [(ll, greedy) for ll, greedy, _ in self._score(windows, "loglikelihood", disable_tqdm)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        doc_windows, windows = [], []
        for req in requests:
            (text,) = req.args
            tokens = self.tok.encode(text)
            prefix = self._rolling_prefix
            if prefix is None:  # the first token is context only (nothing to condition it on)
                prefix, tokens = (tokens[0], tokens[1:]) if tokens else (None, [])
            mine = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, prefix, self._max_length, 1)]
            doc_windows.append(range(len(windows), len(windows) + len(mine)))
            windows += [(ctx + pred[:-1], pred) for ctx, pred in mine]
        scored = self._score(windows, "loglikelihood_rolling", disable_tqdm)
        out = []
        for req, span in zip(requests, doc_windows):
            ll = sum(scored[i][0] for i in span)
            n = sum(scored[i][2] for i in span)
            out.append(RollingLogLikelihood(ll, n))
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(ll))
        return out

    # --- generation

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm, leave=False):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", 256))
            temperature = float(gen_kwargs.pop("temperature", 0.0)) if gen_kwargs.pop("do_sample", False) else 0.0
            max_new = min(max_new, self.model.cfg.max_seq_len - 1)
            ctx_ids = self.tok.encode(context)[-(self.model.cfg.max_seq_len - max_new):] or [self.prefix_token_id]
            if isinstance(self.routes, RandomPolicy):
                self.routes.reset()  # each request routed from the same seed: results do not depend on order
            g = generate_ids(self.model, ctx_ids, self.routes, max_new_tokens=max_new, temperature=temperature,
                             eos_id=self.eot_token_id)
            text = self.tok.decode([t for t in g.new_ids if t != self.eot_token_id])
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with ``--model duollm`` registered and the shipped tasks included."""
    from lm_eval.__main__ import cli_evaluate

    from .tasks import TASKS_DIR

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", str(TASKS_DIR)]  # lm-eval takes one include path: a user's own replaces ours
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
