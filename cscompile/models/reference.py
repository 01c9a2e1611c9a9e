"""The PyTorch (transformers, eager) reference: greedy parity, the eager baseline, perplexity.

Needs the ``export`` extra. Loaded from the ``hf/`` checkpoint of a fetched model, or from
any transformers model object.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from cscompile.decode.generate import GenerationStats
from cscompile.errors import require


class TorchReference:
    """Greedy decode and full-sequence logits with transformers' own model and cache."""

    name = "PyTorch eager (transformers)"

    def __init__(self, model: Any, threads: int | None = None) -> None:
        self.torch = require("torch", "export", "the PyTorch reference")
        if threads:
            self.torch.set_num_threads(threads)
        self.model = model.eval()

    @classmethod
    def from_dir(cls, hf_dir: Path | str, threads: int | None = None) -> TorchReference:
        transformers = require("transformers", "export", "the PyTorch reference")
        torch = require("torch", "export", "the PyTorch reference")
        transformers.utils.logging.disable_progress_bar()  # our callers show their own progress
        model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
        return cls(model, threads)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """``ids [B, L] -> logits [B, L, V]`` (float32 numpy)."""
        with self.torch.no_grad():
            return self.model(self.torch.from_numpy(np.asarray(ids, np.int64))).logits.float().numpy()

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], GenerationStats]:
        """Greedy, fixed length (EOS ignored), timing prefill and every decode step."""
        torch = self.torch
        from transformers import DynamicCache

        st = GenerationStats(prompt_tokens=len(prompt_ids))
        out: list[int] = []
        with torch.no_grad():
            cache = DynamicCache(config=self.model.config)
            ids = torch.tensor([prompt_ids])
            t0 = time.perf_counter()
            res = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
            st.prefill_ms = (time.perf_counter() - t0) * 1e3
            for step in range(max_new_tokens):
                tok = int(res.logits[0, -1].argmax())
                out.append(tok)
                if step + 1 == max_new_tokens:
                    break
                t1 = time.perf_counter()
                res = self.model(
                    input_ids=torch.tensor([[tok]]), past_key_values=res.past_key_values, use_cache=True
                )
                st.decode_ms.append((time.perf_counter() - t1) * 1e3)
        st.new_tokens = len(out)
        st.stop_reason = "length"
        return out, st
