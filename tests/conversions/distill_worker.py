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
    # end the group before exiting: a rank that exits with gloo's threads still running can abort in C++
    # ("terminate called without an active exception"; seen once in CI with other jobs on the cores)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])


def ring_distill(rank, world, steps):
    """Inside run_distributed: distill with the student on ring attention (the same blocks on every rank, split
    along the sequence); returns the weights, losses and what was recorded."""
    import os

    import hf_efficient_attn as hfa
    from tests.conversions.test_distill import SEQ, pair, train_ids

    student, teacher = pair()
    hfa.patch(student, backend="ring")
    try:  # accelerate, not told it is multi-process on CPUs, would not combine the ranks' gradients
        hfa.distill(student, teacher, train_ids(), max_tokens=4 * SEQ, seq_len=SEQ, batch_size=4, progress=False)
    except ValueError as e:
        refused = str(e)
    os.environ["ACCELERATE_USE_CPU"] = "1"  # what `ACCELERATE_USE_CPU=1 accelerate launch` sets
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    res = hfa.distill(student, teacher, train_ids(), max_tokens=steps * 4 * SEQ, seq_len=SEQ, batch_size=4,
                      lr=3e-3, progress=False)
    return dict(weights={n: p.detach().clone() for n, p in student.state_dict().items()}, losses=res.losses,
                tokens=res.tokens, record=student.hfa_conversions[-1],
                teacher_restored=teacher.config._attn_implementation == "eager", refused=refused)
