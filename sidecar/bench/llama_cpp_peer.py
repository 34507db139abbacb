"""The peer side of `ttc-bench`: times llama.cpp (through llama-cpp-python's C bindings) on the
same GGUF file and workload as our engine, and prints one JSON object.

Only the model's forward passes are timed, exactly as on our side: a prompt prefill, then decode
steps of `b` sequences that share the prompt's KV cache, each fed a fixed token.
"""
import argparse
import json
import time

import llama_cpp as L


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--prompt-tokens", type=int, required=True)
    ap.add_argument("--decode-steps", type=int, required=True)
    ap.add_argument("--batches", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(a.model.encode(), mp)
    cp = L.llama_context_default_params()
    cp.n_ctx = 4096
    cp.n_batch = 1024
    cp.n_ubatch = 1024
    cp.n_seq_max = max(batches)
    cp.n_threads = a.threads
    cp.n_threads_batch = a.threads
    # One KV buffer for all sequences, so copying the prompt to other sequences shares cells.
    cp.kv_unified = True
    ctx = L.llama_init_from_model(model, cp)
    mem = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(max(a.prompt_tokens, max(batches)), 0, max(batches))
    token = 504  # any ordinary token; values don't change the cost

    def fill(entries):
        batch.n_tokens = len(entries)
        for i, (pos, seq, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits

    def prefill():
        L.llama_memory_clear(mem, True)
        n = a.prompt_tokens
        fill([(p, 0, p == n - 1) for p in range(n)])
        t = time.perf_counter()
        L.llama_decode(ctx, batch)
        L.llama_synchronize(ctx)
        return time.perf_counter() - t

    prefill()  # warm-up
    prefill_s = min(prefill() for _ in range(a.repeats))
    result = {"prefill_tok_s": a.prompt_tokens / prefill_s, "decode": {}}
    for b in batches:
        best = None
        for _ in range(a.repeats):
            prefill()
            for s in range(1, b):
                L.llama_memory_seq_cp(mem, 0, s, -1, -1)
            t = time.perf_counter()
            for step in range(a.decode_steps):
                fill([(a.prompt_tokens + step, s, True) for s in range(b)])
                L.llama_decode(ctx, batch)
            L.llama_synchronize(ctx)
            elapsed = time.perf_counter() - t
            best = elapsed if best is None else min(best, elapsed)
        result["decode"][str(b)] = {"step_ms": best / a.decode_steps * 1e3, "summed_tok_s": b * a.decode_steps / best}
    result["version"] = L.__version__
    print(json.dumps(result))


if __name__ == "__main__":
    main()
