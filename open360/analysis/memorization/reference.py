"""The reference method (Analysis360): transformers `generate(num_beams=1, do_sample=False)` per batch."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def hf_greedy_continuations(
    hf_model: Any, sequences: np.ndarray | torch.Tensor, k: int, cont_len: int, batch_size: int = 32
) -> np.ndarray:
    """Greedy continuations [N, cont_len] from a transformers causal LM, as Analysis360 computes them.

    Analysis360 calls ``generate(prompt, min_length=k, max_new_tokens=l, num_beams=1,
    do_sample=False)``. Here EOS stopping is switched off (the model's ``generation_config.eos_token_id``
    is set to None for the call, then restored; passing ``eos_token_id=None`` to generate is overridden
    by the model's default), so every row gets exactly ``l`` greedy tokens: with EOS on, a row that
    emits EOS is padded afterwards and a batch whose rows all emit it comes back short. An all-ones
    attention mask is passed so a prompt token equal to the pad id is never masked. `hf_model` must
    already be on its device and dtype.
    """
    device = next(hf_model.parameters()).device
    seqs = torch.as_tensor(np.asarray(sequences) if not torch.is_tensor(sequences) else sequences)
    out = np.empty((seqs.shape[0], cont_len), dtype=np.int32)
    saved_eos = hf_model.generation_config.eos_token_id
    hf_model.generation_config.eos_token_id = None
    try:
        with torch.no_grad():
            for lo in range(0, seqs.shape[0], batch_size):
                prompts = seqs[lo : lo + batch_size, :k].to(device=device, dtype=torch.long)
                generated = hf_model.generate(
                    prompts,
                    attention_mask=torch.ones_like(prompts),
                    max_new_tokens=cont_len,
                    num_beams=1,
                    do_sample=False,
                    pad_token_id=0,
                )[:, k:]
                if generated.shape[1] != cont_len:
                    raise RuntimeError(
                        f"memorization reference: generate returned {generated.shape[1]} new tokens, "
                        "expected "
                        f"{cont_len}; check the model's generation_config"
                    )
                out[lo : lo + prompts.shape[0]] = generated.cpu().numpy()
    finally:
        hf_model.generation_config.eos_token_id = saved_eos
    return out
