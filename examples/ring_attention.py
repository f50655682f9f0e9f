"""Ring attention on a real model: one long sequence split across processes, checked against one process.

    torchrun --nproc-per-node 2 examples/ring_attention.py --tokens 8192            # CPU: gloo
    torchrun --nproc-per-node 4 examples/ring_attention.py --tokens 8192 --json ring.json
    torchrun --nproc-per-node 8 examples/ring_attention.py --model <hub id> ...     # GPUs: NCCL, one per process

Each process loads the model; rank 0 also runs it unpatched on the whole sequence (the single-process reference).
Then every process runs ``hfa.patch(model, backend="ring")`` on its 1/W of the sequence (``hfa.ring.prepare``:
zigzag split, positions following) and we report, over all ranks:

* max |ring logits - single-process logits| (the reference's final hidden states are broadcast and each rank
  applies the LM head to its own rows) and the perplexity of the sequence both ways (``hfa.ring.lm_loss``);
* bytes each rank sent during the ring prefill (``count_comm``) and its peak resident memory;
* greedy decoding: ``hfa.ring.generate`` (the prompt's KV cache stays split) vs transformers' ``generate`` on one
  process, on the first ``--gen-prompt`` tokens.
"""

import argparse
import json
import math
import os
import resource
import time

import torch
import torch.distributed as dist

import hf_efficient_attn as hfa
from hf_efficient_attn.eval import load_model, load_text
from hf_efficient_attn.eval.perplexity import tokenize_stream
from hf_efficient_attn.kernels.ring import count_comm


def _max(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


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
    world, rank = dist.get_world_size(), dist.get_rank()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    model, tok = load_model(args.model)
    model.to(dev)
    ids = tokenize_stream(tok, load_text(None), max_tokens=args.tokens)[None, :args.tokens].to(dev)

    # -- the single-process reference, on rank 0
    hidden = torch.empty(1, ids.shape[1], model.config.hidden_size, device=dev)
    with torch.no_grad():
        if rank == 0:
            t0 = time.perf_counter()
            hidden.copy_(model.model(input_ids=ids).last_hidden_state)
            ref_seconds = time.perf_counter() - t0
            ref_logits = model.lm_head(hidden)
            ref_ppl = math.exp(torch.nn.functional.cross_entropy(ref_logits[0, :-1].float(), ids[0, 1:]).item())
            del ref_logits
        dist.broadcast(hidden, 0)

        # -- ring: this rank's 1/W of the sequence
        hfa.patch(model, backend="ring")
        batch = hfa.ring.prepare(ids, labels=ids)
        shift = batch.pop("shift_labels")
        dist.barrier()
        t0 = time.perf_counter()
        with count_comm() as cc:
            logits = model(**batch).logits
        seconds = _max(time.perf_counter() - t0)
        loss = hfa.ring.lm_loss(logits, shift)
        dist.all_reduce(loss)
        mine = hfa.ring.shard(hidden, dim=1)
        diff = _max((logits - model.lm_head(mine)).abs().max().item())
        sent = _max(cc.sent_bytes)
        peak = _max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

        # -- greedy decoding over a split cache vs one process
        prompt = ids[:, :args.gen_prompt]
        got = hfa.ring.generate(model, prompt, args.new_tokens)
        hfa.unpatch(model)
        same = None
        if rank == 0:
            ref = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 pad_token_id=tok.pad_token_id or 0)
            same = bool(torch.equal(got, ref))

    if rank == 0:
        res = dict(model=args.model, world=world, tokens=ids.shape[1], device=str(dev), max_abs_logit_diff=diff,
                   ppl_ring=math.exp(loss.item()), ppl_single=ref_ppl, seconds_ring=seconds,
                   seconds_single=ref_seconds, bytes_sent_per_rank=sent, peak_rss_bytes_per_rank=peak,
                   generate_equal=same, gen_prompt=prompt.shape[1], new_tokens=args.new_tokens)
        print(f"ring attention, {args.model}, {ids.shape[1]} tokens over {world} processes ({dev.type}):")
        print(f"  max |logits ring - single process| = {diff:.2e}; ppl {res['ppl_ring']:.4f} (ring) vs "
              f"{ref_ppl:.4f} (single)")
        print(f"  prefill {seconds:.1f} s (single process {ref_seconds:.1f} s); sent {sent / 2**20:.1f} MiB per rank; "
              f"peak RSS {peak / 2**30:.2f} GiB per rank")
        print(f"  greedy decoding of {args.new_tokens} tokens after {prompt.shape[1]}: "
              f"{'equal to' if same else 'DIFFERENT FROM'} one process")
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(res, f, indent=2)
            os.replace(args.json + ".tmp", args.json)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
