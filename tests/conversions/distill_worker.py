"""Run by test_distill under `accelerate launch` (2 CPU processes): distill a tiny MQA student, save the result.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 tests/conversions/distill_worker.py OUT
"""

import sys

import torch

from tests.conversions.test_distill import run_tiny


def main(out):
    from accelerate import PartialState

    res = run_tiny(batch_size=2, progress=False)
    state = PartialState()
    weights = {n: p.detach().clone() for n, p in res.model.state_dict().items()}
    gathered = [None] * state.num_processes
    torch.distributed.all_gather_object(gathered, weights)      # every rank must end with the same weights
    same = all(torch.equal(w[n], weights[n]) for w in gathered for n in weights)
    if state.is_main_process:
        torch.save({"weights": weights, "losses": res.losses, "tokens": res.tokens, "processes": state.num_processes,
                    "ranks_agree": same}, out)


if __name__ == "__main__":
    main(sys.argv[1])
