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
