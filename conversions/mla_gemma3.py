"""Gemma 3 270M -> MLA: held-out perplexity against KV-cache bytes/token over a sweep of latent ranks.

    python conversions/mla_gemma3.py                                       # training-free sweep, 4 ranks
    python conversions/mla_gemma3.py --heal 224:32 --heal-tokens 12288     # + heal one point by distillation
    python conversions/mla_gemma3.py --ranks 96:32 --eval-tokens 1024 --calibration-tokens 1024   # a few minutes

Gemma 3 270M caches 2 x 1 KV head x 256 = 512 values per token and layer (18 layers; 15 of them slide over 512
tokens, so past 512 tokens they stop growing); MLA caches r + d_r. Its keys are RMS-normed per head (k_norm)
before RoPE, so the latent is a linear map of [k_norm(k); v] (``attention.mla.Gemma3MLAAttention``); every
layer keeps its own RoPE (local theta on the sliding layers) and window. The steps and the protocol are
``mla_sweep.py``'s (calibration / train / held-out eval splits of the bundled corpus); the defaults here fit
about ten minutes of two CPU cores (the 262k-word vocabulary makes every evaluated token cost).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mla_sweep import parse_args, run  # noqa: E402


def main(argv=None):
    return run(parse_args(argv, __doc__.split("\n")[0], model="gemma3-270m", ranks="352:32,224:32,160:32,96:32",
                          out="out/mla_gemma3", calibration_tokens=4096, eval_tokens=4096))


if __name__ == "__main__":
    main()
