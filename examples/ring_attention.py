"""Ring attention on a real model: one long sequence split across processes, checked against one process.

    torchrun --standalone --nproc-per-node 2 examples/ring_attention.py --tokens 8192           # CPU: gloo
    torchrun --standalone --nproc-per-node 4 examples/ring_attention.py --tokens 8192 --json ring.json
    torchrun --nproc-per-node 8 examples/ring_attention.py --model <hub id> ...                 # GPUs: NCCL

Each process loads the model; rank 0 also runs it unpatched on the whole sequence (the single-process reference).
Then every process runs ``hfa.patch(model, backend="ring")`` on its 1/W of the sequence (``hfa.ring.prepare``:
zigzag split, positions following) and rank 0 prints, over all ranks: max |ring logits - single-process logits|,
the perplexity both ways, the bytes each rank sent during the prefill, the peak resident memory per rank, and
whether greedy decoding over the split cache (``hfa.ring.generate``) equals transformers' ``generate`` on one
process (``hf_efficient_attn.eval.ring_check``; ``hfa demo`` runs the same check on 2 local processes).
"""

import argparse
import json
import os

import torch
import torch.distributed as dist

from hf_efficient_attn.eval.ring_check import format_ring_check, ring_check_rank


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=8192, help="length of the sequence split across the ranks")
    ap.add_argument("--gen-prompt", type=int, default=512, help="prompt tokens for the greedy-decoding check")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    if not cuda:  # W processes share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    try:
        res = ring_check_rank(args.model, tokens=args.tokens, gen_prompt=args.gen_prompt, new_tokens=args.new_tokens,
                              device=device)
    finally:
        dist.destroy_process_group()
    if res is not None:
        print(format_ring_check(res))
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(res, f, indent=2)
            os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
