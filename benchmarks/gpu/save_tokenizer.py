"""Save a bundled model's tokenizer as Hugging Face tokenizer files, for
``ember serve --tokenizer DIR`` on a GPU machine that cannot download the
bundled models (the serving benchmark serves a preset with random weights as
text through these files).

    python benchmarks/gpu/save_tokenizer.py [MODEL] [DIR]   # default: Qwen2.5-Coder-0.5B-Instruct -> .carry/qwen-tokenizer

The tokenizer's vocabulary must hold every id the served model can sample
(see the NOTE in benchmarks/gpu/serving.sh): Qwen2.5's holds the 8B presets'.
"""

from __future__ import annotations

import sys

from ember.loader.source import load_tokenizer_for

model = sys.argv[1] if len(sys.argv) > 1 else "Qwen2.5-Coder-0.5B-Instruct"
out = sys.argv[2] if len(sys.argv) > 2 else ".carry/qwen-tokenizer"
load_tokenizer_for(model).save_pretrained(out)
print(f"{model}'s tokenizer saved to {out}")
