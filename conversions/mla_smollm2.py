"""SmolLM2-135M -> MLA: held-out perplexity against KV-cache bytes/token over a sweep of latent ranks.

    python conversions/mla_smollm2.py                                    # training-free sweep, 4 ranks
    python conversions/mla_smollm2.py --heal-tokens 12288 --heal 128:64  # + heal one point by distillation
    python conversions/mla_smollm2.py --ranks 96:16 --eval-tokens 1024 --calibration-tokens 2048  # a minute

SmolLM2-135M caches 2 x 3 KV heads x 64 = 384 values per token and layer; MLA caches r + d_r. The steps and
the protocol are ``mla_sweep.py``'s (calibration / train / held-out eval splits of the bundled corpus).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mla_sweep import parse_args, run  # noqa: E402


def main(argv=None):
    return run(parse_args(argv, __doc__.split("\n")[0], model="smollm2-135m", ranks="320:32,224:32,160:32,96:32",
                          out="out/mla_smollm2"))


if __name__ == "__main__":
    main()
