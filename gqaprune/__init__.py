"""gqaprune: GQA-aware structured pruning of HuggingFace decoder LLMs, driven by YAML recipes."""

__version__ = "0.1.0"


def load_pretrained(path, dtype=None, device="cpu", attn_implementation=None):
    """Load any gqaprune output folder (uniform or per-layer shapes); see gqaprune.io.checkpoint."""
    from gqaprune.io.checkpoint import load_pretrained as _load

    return _load(path, dtype=dtype, device=device, attn_implementation=attn_implementation)
