"""lm-evaluation-harness on binaryllm models: wrap an in-memory model (or a run/packed folder) in lm-eval's
``HFLM``, so ``lm_eval.simple_evaluate(model=hflm(...), tasks=[...])`` evaluates exactly what binaryllm built.

lm-eval is optional (``pip install lm-eval``); its tasks download their data from the hub unless the
datasets cache has them, which is why ``binaryllm eval`` has its own offline scorer (tested to agree)."""
from __future__ import annotations

from ..errors import BinaryLLMError


def hflm(model, tokenizer=None, batch_size: int = 8, device: str = "cpu", max_length: int = 2048, **kw):
    """An lm-eval ``HFLM`` over ``model`` (a module, or a path that ``binaryllm eval`` can open)."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise BinaryLLMError("the lm-eval adapter needs lm-evaluation-harness: pip install lm-eval") from None
    if isinstance(model, str):
        from .run import open_model
        model, tok, _ = open_model(model, device)
        tokenizer = tokenizer or tok
    if tokenizer is None:
        raise BinaryLLMError("hflm() needs the model's tokenizer when given a module")
    return HFLM(pretrained=model.to(device).eval(), tokenizer=tokenizer, batch_size=batch_size, device=device,
                max_length=max_length, **kw)
