"""The transformers side of scripts/gpu-check, run on the GPU machine with its torch and
transformers. Commands:

  reference DIR      a Llama-3.2-1B-shaped model with random weights from a fixed seed, saved by
                     transformers as safetensors in DIR/model (with a byte-level tokenizer.json so
                     the agent can serve it), 8 token-id prompts in DIR/prompts.json, and the
                     model's last-position logits (DIR/reference.f32) and 32 greedy tokens with
                     each step's top-1 margin (DIR/reference.json), in bf16; the same from the
                     weights in f32 (DIR/reference-f32.*), the arbiter; `reference DIR GGUF`:
                     the same for that GGUF file's model, dequantized by transformers
  compare DIR PARALLAX_JSON   cosine and top-1 agreement of the agent's logits (the .f32 file
                     beside PARALLAX_JSON) against the reference's, and greedy agreement where
                     the reference is decisive; the same against the f32 arbiter, and
                     transformers' bf16 against it
  throughput SHAPE BATCH...   generate() with static batches: 512-token prompts, 128 new tokens
                     (EOS never ends them), output tokens per second
  summarize WORK     every part's output under WORK (one JSON file per part, *.json, and its exit
                     code in *.rc) in one object, with the issue's ratios where their parts ran

Each prints one JSON object. `scripts/gpu-check --rehearse` runs them on the CPU with smaller
sizes, set through the environment: GPU_CHECK_DEVICE (torch's device, cuda unless set),
GPU_CHECK_REFERENCE_LAYERS (the reference model's layers), GPU_CHECK_PROMPT_LEN and
GPU_CHECK_MAX_TOKENS (throughput's prompt and output lengths).
"""

import json
import os
import sys
import time


SHAPES = {
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "llama-3.2-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
    "llama-3.1-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
}
DECISIVE = 0.1
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")


def model(shape, seed=0, layers=None):
    """Random weights in bf16, made as from_pretrained makes a model: the RoPE frequencies stay
    f32 (`.to(torch.bfloat16)` would round them to bf16, and the logits drift with position)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    config = LlamaConfig(max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=None,
                         eos_token_id=None, pad_token_id=0, **shape)
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        m = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return m.eval()


def synchronize():
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def byte_tokenizer(directory):
    """A tokenizer.json whose 256 byte tokens need no merges, and an end token."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    alphabet = sorted(chr(c) for c in cs)
    vocab = {c: i for i, c in enumerate(alphabet)}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "post_processor": None,
        "added_tokens": [{"id": 256, "content": "</s>", "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": False, "vocab": vocab, "merges": []},
    }
    with open(os.path.join(directory, "tokenizer.json"), "w") as f:
        json.dump(tokenizer, f)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "</s>"}, f)


def run_reference(m, prompts):
    """Last-position logits (one f32 row per prompt) and 32 greedy tokens per prompt with each
    step's top-1 margin, from model m."""
    import torch

    rows, greedy, margins = [], [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=DEVICE)
            rows.append(m(ids).logits[0, -1].float().cpu())
            out = m.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
            greedy.append(out.sequences[0, len(p):].tolist())
            step_margins = []
            for scores in out.scores:
                top = torch.topk(scores[0].float(), 2).values
                step_margins.append(float(top[0] - top[1]))
            margins.append(step_margins)
    return torch.stack(rows).numpy(), {"greedy": greedy, "margins": margins}


def reference(directory, gguf=None):
    """The saved model loaded as users load it, in bf16 (what the agent serves on a GPU) and, as
    the arbiter, in f32: how far bf16 alone moves transformers from f32 is the agent's yardstick.
    With `gguf`, that file's model (transformers dequantizes it) instead of random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if gguf:
        path, files = os.path.dirname(gguf), {"gguf_file": os.path.basename(gguf)}
    else:
        m = model("llama-3.2-1b", layers=int(os.environ.get("GPU_CHECK_REFERENCE_LAYERS", 0)))
        path, files = os.path.join(directory, "model"), {}
        m.save_pretrained(path, safe_serialization=True)
        del m
        byte_tokenizer(path)
    vocab = AutoConfig.from_pretrained(path, **files).vocab_size
    g = torch.Generator().manual_seed(1)
    lengths = [5, 17, 33, 64, 100, 128, 200, 256]
    # Ids clear of the special tokens at either end of the vocabularies here.
    prompts = [torch.randint(300, vocab - 300, (n,), generator=g).tolist() for n in lengths]
    with open(os.path.join(directory, "prompts.json"), "w") as f:
        json.dump(prompts, f)
    for name, precision in (("reference", torch.bfloat16), ("reference-f32", torch.float32)):
        m = AutoModelForCausalLM.from_pretrained(path, dtype=precision, **files).to(DEVICE).eval()
        layers = m.config.num_hidden_layers
        rows, greedy = run_reference(m, prompts)
        del m
        rows.astype("<f4").tofile(os.path.join(directory, name + ".f32"))
        with open(os.path.join(directory, name + ".json"), "w") as f:
            json.dump(greedy, f)
    print(json.dumps({"reference": os.path.basename(gguf or "llama-3.2-1b"),
                      "prompts": len(prompts),
                      "layers": layers,
                      "transformers": __import__("transformers").__version__,
                      "torch": torch.__version__}))


def agreement(want_rows, got_rows, want, got):
    """Cosine and top-1 agreement of the logit rows, and greedy agreement up to the first step
    where `want` (greedy tokens and margins) is not decisive."""
    import numpy as np

    cosines = [float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))
               for x, y in zip(want_rows, got_rows)]
    top1 = [int(np.argmax(x) == np.argmax(y)) for x, y in zip(want_rows, got_rows)]
    agree, decisive, first_disagreement = 0, 0, []
    for tokens, ours, margin in zip(want["greedy"], got, want["margins"]):
        stop = next((i for i, m in enumerate(margin) if m <= DECISIVE), len(margin))
        decisive += stop
        agree += sum(int(w == g) for w, g in zip(tokens[:stop], ours[:stop]))
        first_disagreement.append(
            next((i for i, (w, g) in enumerate(zip(tokens, ours)) if w != g), None))
    return {
        "cosine_min": min(cosines), "cosines": cosines, "cosine_ok": min(cosines) >= 0.999,
        "max_abs_diff": float(np.abs(np.asarray(want_rows) - np.asarray(got_rows)).max()),
        "top1_agreement": sum(top1) / len(top1),
        "greedy_decisive_positions": decisive,
        "greedy_agreement_where_decisive": agree / decisive if decisive else None,
        "first_disagreement": first_disagreement,
    }


def compare(directory, parallax_json):
    """The agent against transformers in bf16 (the issue's comparison), against the f32 arbiter,
    and transformers' own bf16 against the arbiter (the floor bf16 sets)."""
    import numpy as np

    with open(parallax_json) as f:
        ours = json.load(f)
    vocab = ours["vocab"]

    def logits(path):
        """The f32 rows beside a JSON file."""
        return np.fromfile(os.path.splitext(path)[0] + ".f32", dtype="<f4").reshape(-1, vocab)

    def load(name):
        path = os.path.join(directory, name + ".json")
        with open(path) as f:
            return logits(path), json.load(f)

    rows = logits(parallax_json)
    bf16, f32 = load("reference"), load("reference-f32")
    result = agreement(bf16[0], rows, bf16[1], ours["greedy"])
    result["vs_f32"] = agreement(f32[0], rows, f32[1], ours["greedy"])
    result["transformers_bf16_vs_f32"] = agreement(f32[0], bf16[0], f32[1], bf16[1]["greedy"])
    print(json.dumps(result))


def throughput(shape, batches):
    import torch

    prompt_len = int(os.environ.get("GPU_CHECK_PROMPT_LEN", 512))
    new_tokens = int(os.environ.get("GPU_CHECK_MAX_TOKENS", 128))
    m = model(shape)
    g = torch.Generator().manual_seed(2)
    results = {}
    with torch.no_grad():
        for batch in batches:
            ids = torch.randint(0, SHAPES[shape]["vocab_size"], (batch, prompt_len),
                                generator=g).to(DEVICE)
            m.generate(ids[:, :16], max_new_tokens=2, do_sample=False)  # warm-up
            synchronize()
            start = time.perf_counter()
            m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            synchronize()
            seconds = time.perf_counter() - start
            results[str(batch)] = {"seconds": seconds,
                                   "output_tokens_per_s": batch * new_tokens / seconds}
    card = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    print(json.dumps({"engine": "transformers", "shape": shape, "batches": results,
                      "card": card}))


# Memory bandwidth of the cards the check meets, bytes per second (NVIDIA's data sheets).
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def summarize(work):
    parts = {}
    for name in sorted(os.listdir(work)):
        if not name.endswith(".rc"):
            continue
        part = name[:-3]
        with open(os.path.join(work, name)) as f:
            rc = int(f.read().strip() or 1)
        result = None
        try:
            with open(os.path.join(work, part + ".json")) as f:
                result = json.loads(f.read().strip().splitlines()[-1])
        except (OSError, ValueError, IndexError):
            pass
        parts[part] = {"rc": rc, "result": result}
    summary = {"parts": parts}

    def outcome(part):
        """A part's JSON result, or {} where it did not run or gave none."""
        return parts.get(part, {}).get("result") or {}

    card = next((p["result"]["card"] for n, p in parts.items()
                 if n.startswith("transformers-") and (p["result"] or {}).get("card")), "")
    for shape in SHAPES:
        theirs = outcome(f"transformers-{shape}").get("batches", {})
        ours = {b: outcome(f"parallax-{shape}-{b}") for b in theirs}
        if "1" not in theirs or not all(ours.values()):
            continue
        best_static = max(r["output_tokens_per_s"] for r in theirs.values())
        best_ours = max(r["output_tokens_per_s"] for r in ours.values())
        entry = {
            "parallax_output_tokens_per_s": {b: r["output_tokens_per_s"] for b, r in ours.items()},
            "transformers_output_tokens_per_s": {b: r["output_tokens_per_s"] for b, r in theirs.items()},
            "vs_transformers_batch_1": best_ours / theirs["1"]["output_tokens_per_s"],
            "vs_transformers_best_static": best_ours / best_static,
        }
        bandwidth = next((v for k, v in BANDWIDTH.items() if k in card), None)
        weights = {"smollm2-135m": 0.27e9, "llama-3.2-1b": 2.47e9, "llama-3.1-8b": 16.06e9}[shape]
        tpot = ours["1"].get("tpot_ms", {}).get("p50")
        if bandwidth and tpot:
            bound_ms = weights / bandwidth * 1e3
            entry["decode_step_batch_1_ms"] = tpot
            entry["bandwidth_bound_ms"] = bound_ms
            entry["over_bound"] = tpot / bound_ms
        summary[shape] = entry
    # Each comparison with transformers in one line: the agent against its bf16 (the issue's
    # bar) and against f32, beside the floor transformers' own bf16 sets.
    for name, part in parts.items():
        result = part["result"] or {}
        if name.startswith("correctness") and "vs_f32" in result:
            summary.setdefault("correctness", {})[name] = {
                "cosine_vs_transformers_bf16": result["cosine_min"],
                "cosine_vs_f32": result["vs_f32"]["cosine_min"],
                "transformers_bf16_vs_f32": result["transformers_bf16_vs_f32"]["cosine_min"],
                "greedy_where_decisive": result["greedy_agreement_where_decisive"],
                "cosine_ok": result["cosine_ok"],
            }
    # The launch floor: a batch-1 step of a model the card reads in microseconds is the host's
    # time (launches, bookkeeping), which CUDA graphs would take out of the 8B step.
    floor = outcome("parallax-smollm2-135m-1").get("tpot_ms", {}).get("p50")
    step_8b = outcome("parallax-llama-3.1-8b-1").get("tpot_ms", {}).get("p50")
    if floor:
        summary["launch_floor_ms"] = floor
        if step_8b:
            summary["launch_floor_share_of_8b_step"] = floor / step_8b
    # Attention at batch 1: the 8B step with blocks of 4 warps against the default (a grid of
    # one block per KV head gets as many warps as the shape allows).
    four = outcome("parallax-llama-3.1-8b-1-w4").get("tpot_ms", {}).get("p50")
    if four and step_8b:
        summary["attention_warps_8b_batch_1_step_ms"] = {"default": step_8b, "4": four}
    # Attention at batch 1 with each token's positions split over 8 blocks, eager and replayed.
    steps = {label: outcome(part).get("tpot_ms", {}).get("p50") for label, part in [
        ("default", "parallax-llama-3.1-8b-1"),
        ("split8", "parallax-llama-3.1-8b-1-split8"),
        ("graphs", "parallax-llama-3.1-8b-1-graphs"),
        ("split8_graphs", "parallax-llama-3.1-8b-1-split8-graphs")]}
    if any(steps.values()):
        summary["attention_splits_8b_batch_1_step_ms"] = steps
    split_check = outcome("kernels-llama-3.1-8b-split8")
    if split_check:
        summary["attention_splits_8b_kernels"] = {
            "max_abs_difference": split_check.get("max_abs_difference"),
            "lowest_cosine": split_check.get("lowest_cosine"),
            "graphs": split_check.get("graphs"),
        }
    # CUDA graphs: each bench with decode steps replayed against the same bench without, and
    # check-kernels' replayed steps against the same steps run eagerly.
    graphs = {}
    for name, part in parts.items():
        if not (name.startswith("parallax-") and name.endswith("-graphs")):
            continue
        ours, eager = part["result"] or {}, outcome(name[:-len("-graphs")])
        if not (ours and eager):
            continue
        graphs[name[len("parallax-"):-len("-graphs")]] = {
            "tpot_ms_p50": {"eager": eager["tpot_ms"]["p50"], "graphs": ours["tpot_ms"]["p50"]},
            "output_tokens_per_s_ratio": ours["output_tokens_per_s"] / eager["output_tokens_per_s"],
            "graph_steps": ours.get("graph_steps"),
            "steps": ours.get("steps"),
        }
    for name, part in parts.items():
        replayed = (part["result"] or {}).get("graphs")
        if name.startswith("kernels-") and replayed:
            graphs[name] = replayed
    if graphs:
        summary["cuda_graphs"] = graphs
    # NCCL at world size 1: a group of one rank summing through NCCL against the whole model.
    nccl = outcome("parallax-llama-3.2-1b-64-nccl")
    whole = outcome("parallax-llama-3.2-1b-64")
    if nccl and whole:
        summary["nccl_world_1_vs_whole_batch_64"] = (
            nccl["output_tokens_per_s"] / whole["output_tokens_per_s"])
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "reference":
        reference(*args)
    elif command == "compare":
        compare(*args)
    elif command == "throughput":
        throughput(args[0], [int(b) for b in args[1:]])
    elif command == "summarize":
        summarize(*args)
    else:
        sys.exit(f"unknown command {command}")
