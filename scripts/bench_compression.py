"""Benchmark swarmnode.compression: DeMo payload size per parameter, index bits, speed, fuzzing.

Prints ONE JSON object. Sizes are measured on the parameter shapes of Qwen2-0.5B (24 layers,
hidden 896, MLP 4864, 2 KV heads of 64, vocab 151936, tied embedding) with top-32 per 4096-element
chunk, counting every byte of real `swarmnode.protocol` DemoComponents messages (codec.encode),
packed greedily under the gossip size limit. The embedding's components (~2.2 MB) exceed one
gossip message, so it is sent as row slabs of 4096 rows, each its own TensorComponents; slabs
are multiples of 64 rows, so the DCT tiles and the selected components are exactly those of the
whole matrix. The 24 layers share shapes, so one layer is coded and counted 24 times.

Usage: nice -n 10 python scripts/bench_compression.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from swarmnode.compression import components, dct, framing, indices, quant, values
from swarmnode.protocol import codec, limits
from swarmnode.protocol.errors import ProtocolError
from swarmnode.protocol.records import DemoComponents, TensorComponents

K = 32
CHUNK = 64
AUTHOR = "12D3KooW" + "A" * 44  # a peer id of realistic length
COHORT = "f" * 64
EMBED_SLAB_ROWS = 4096


def qwen2_05b_shapes(
    vocab: int, layers: int
) -> tuple[list[tuple[str, tuple[int, ...]]], list[tuple[str, tuple[int, ...]]]]:
    """(one layer's tensors, the rest) for a Qwen2-0.5B-like model."""
    h, inter, kv = 896, 4864, 128
    layer = [
        ("self_attn.q_proj.weight", (h, h)),
        ("self_attn.q_proj.bias", (h,)),
        ("self_attn.k_proj.weight", (kv, h)),
        ("self_attn.k_proj.bias", (kv,)),
        ("self_attn.v_proj.weight", (kv, h)),
        ("self_attn.v_proj.bias", (kv,)),
        ("self_attn.o_proj.weight", (h, h)),
        ("mlp.gate_proj.weight", (inter, h)),
        ("mlp.up_proj.weight", (inter, h)),
        ("mlp.down_proj.weight", (h, inter)),
        ("input_layernorm.weight", (h,)),
        ("post_attention_layernorm.weight", (h,)),
    ]
    rest: list[tuple[str, tuple[int, ...]]] = [("model.norm.weight", (h,))]
    for start in range(0, vocab, EMBED_SLAB_ROWS):
        rows = min(EMBED_SLAB_ROWS, vocab - start)
        rest.append((f"model.embed_tokens.weight[{start}:{start + rows}]", (rows, h)))
    return layer, rest


def code_tensor(
    name: str, shape: tuple[int, ...], value_codec: str, gen: torch.Generator
) -> tuple[TensorComponents, dict[str, float]]:
    """DCT + top-k + encode one tensor of random momentum; time the full path including decode."""
    x = torch.randn(shape, generator=gen)
    t0 = time.perf_counter()
    t = dct.ChunkedDCT(shape, chunk=CHUNK)
    coeffs = t.forward(x)
    k = min(K, t.chunk_numel)
    idx, vals = dct.topk_chunks(coeffs, k)
    payload = components.encode_components(idx, vals, chunk_numel=t.chunk_numel, value_codec=value_codec)
    idx2, vals2 = components.decode_components(
        payload, n_chunks=t.n_chunks, k=k, chunk_numel=t.chunk_numel, value_codec=value_codec
    )
    t.inverse(dct.scatter_chunks(idx2, vals2, t.n_chunks, t.chunk_numel))
    elapsed = time.perf_counter() - t0
    assert torch.equal(idx2, idx)
    rec = TensorComponents(
        name=name,
        shape=shape,
        n_chunks=t.n_chunks,
        k=k,
        chunk_numel=t.chunk_numel,
        value_codec=value_codec,  # type: ignore[arg-type]
        payload=payload,
    )
    stats = {"seconds": elapsed, "energy": dct.energy_ratio(coeffs, idx) * x.numel()}
    if t.chunk_numel == 4096 and k == K:
        stats["index_bytes"] = len(indices.encode_indices(idx, t.chunk_numel))
        stats["n_index"] = idx.numel()
    return rec, stats


def pack_messages(recs: list[TensorComponents]) -> list[bytes]:
    """Greedy: add tensors to a DemoComponents message while it stays under its size limit."""
    out: list[bytes] = []
    current: list[TensorComponents] = []
    for rec in recs:
        trial = _encode([*current, rec])
        if trial is None:
            if not current:
                raise RuntimeError(f"{rec.name}: one tensor's components exceed the gossip limit")
            out.append(_encode(current) or b"")
            current = [rec]
        else:
            current.append(rec)
    if current:
        out.append(_encode(current) or b"")
    return out


def _encode(tensors: list[TensorComponents]) -> bytes | None:
    if len(tensors) > limits.MAX_TENSORS_PER_MESSAGE:
        return None
    try:
        return codec.encode(
            DemoComponents(author=AUTHOR, cohort=COHORT, step=123456, lr=1e-3, tensors=tensors)
        )
    except ProtocolError:
        return None


def model_bytes(value_codec: str, vocab: int, layers: int, seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    layer, rest = qwen2_05b_shapes(vocab, layers)
    layer_recs, layer_stats = zip(
        *(code_tensor(f"model.layers.0.{n}", s, value_codec, gen) for n, s in layer), strict=True
    )
    rest_recs, rest_stats = zip(*(code_tensor(n, s, value_codec, gen) for n, s in rest), strict=True)
    layer_params = sum(math.prod(s) for _, s in layer)
    rest_params = sum(math.prod(s) for _, s in rest)
    n_params = layers * layer_params + rest_params
    layer_msgs = pack_messages(list(layer_recs))
    rest_msgs = pack_messages(list(rest_recs))
    total = layers * sum(map(len, layer_msgs)) + sum(map(len, rest_msgs))
    payload = layers * sum(len(r.payload) for r in layer_recs) + sum(len(r.payload) for r in rest_recs)
    seconds = layers * sum(s["seconds"] for s in layer_stats) + sum(s["seconds"] for s in rest_stats)
    energy = layers * sum(s["energy"] for s in layer_stats) + sum(s["energy"] for s in rest_stats)
    all_stats = [*layer_stats, *rest_stats]
    ib = sum(s.get("index_bytes", 0) for s in all_stats)
    ni = sum(s.get("n_index", 0) for s in all_stats)
    return {
        "n_params": n_params,
        "bytes": total,
        "payload_bytes": payload,
        "messages": layers * len(layer_msgs) + len(rest_msgs),
        "seconds": seconds,
        "energy_ratio": energy / n_params,
        "index_bits": ib * 8 / ni,
    }


def zstd_speed(mb: int) -> tuple[float, float, float]:
    """(compress MB/s, decompress MB/s, ratio) on a float32 tensor dict (low-entropy bf16-like data)."""
    gen = torch.Generator().manual_seed(0)
    t = (torch.randn(mb * 2**18, generator=gen) * 0.02).to(torch.bfloat16).float()  # 4 bytes/elem
    data = quant.encode_tensor_dict({"w": t})
    t0 = time.perf_counter()
    frame = framing.compress(data)
    t1 = time.perf_counter()
    back = framing.decompress(frame, max_size=len(data))
    t2 = time.perf_counter()
    assert back == data
    size_mb = len(data) / 2**20
    return size_mb / (t1 - t0), size_mb / (t2 - t1), len(data) / len(frame)


def fuzz_inputs(rng: random.Random) -> Iterator[tuple[str, Callable[[bytes], Any], bytes]]:
    """Endless (decoder name, decoder, valid bytes) to mutate."""
    gen = torch.Generator().manual_seed(1)
    coeffs = torch.randn(4, 4096, generator=gen)
    idx, vals = dct.topk_chunks(coeffs, K)
    small = torch.randn(3, 64, generator=gen)
    sidx, _svals = dct.topk_chunks(small, 5)
    cases: list[tuple[str, Callable[[bytes], Any], bytes]] = [
        (
            "framing",
            lambda d: framing.decompress(d, max_size=1 << 16),
            framing.compress(rng.randbytes(200) + b"z" * 3000),
        ),
        ("indices", lambda d: indices.decode_indices(d, 4, K, 4096), indices.encode_indices(idx, 4096)),
        ("indices-small", lambda d: indices.decode_indices(d, 3, 5, 64), indices.encode_indices(sidx, 64)),
        ("values-int8", lambda d: values.decode_values(d, 4, K, "int8"), values.encode_values(vals, "int8")),
        ("values-sign", lambda d: values.decode_values(d, 4, K, "sign"), values.encode_values(vals, "sign")),
    ]
    for vc in ("int8", "sign"):
        cases.append(
            (
                f"components-{vc}",
                lambda d, vc=vc: components.decode_components(
                    d, n_chunks=4, k=K, chunk_numel=4096, value_codec=vc
                ),
                components.encode_components(idx, vals, chunk_numel=4096, value_codec=vc),
            )
        )
    w = torch.randn(37, 41, generator=gen)
    cases.append(
        (
            "quant-int8",
            lambda d: quant.dequantize_int8(d, shape=(37, 41), max_bytes=1 << 16),
            quant.quantize_int8(w, block=256),
        )
    )
    td = {"a": torch.randn(4, 3, generator=gen), "b": torch.arange(5), "c": torch.ones(2).bfloat16()}
    cases.append(
        (
            "tensor-dict",
            lambda d: quant.decode_tensor_dict(d, max_bytes=1 << 16),
            quant.encode_tensor_dict(td),
        )
    )
    while True:
        yield rng.choice(cases)


def mutate(data: bytes, rng: random.Random) -> bytes:
    op = rng.randrange(7)
    b = bytearray(data)
    if op == 0:  # bit flips
        for _ in range(rng.randrange(1, 6)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif op == 1:  # truncation
        del b[rng.randrange(len(b)) :]
    elif op == 2:  # appended garbage
        b += rng.randbytes(rng.randrange(1, 64))
    elif op == 3:  # overwrite a header byte with an extreme value
        b[rng.randrange(min(len(b), 16))] = rng.choice([0, 0xFF, 0x7F, 0x80])
    elif op == 4:  # random bytes of a similar length
        b = bytearray(rng.randbytes(rng.randrange(0, len(data) + 16)))
    elif op == 5:  # splice a random run
        i = rng.randrange(len(b))
        b[i : i + 8] = rng.randbytes(8)
    else:  # oversized
        b += b"\x00" * (1 << 16)
    return bytes(b)


def fuzz(n: int, seed: int) -> tuple[int, int, dict[str, int]]:
    """Decode n mutated inputs; a failure is any exception other than ProtocolError.

    Warnings count as failures too (an overflow warning means inf/nan leaked into a tensor).
    """
    warnings.simplefilter("error")
    rng = random.Random(seed)
    failures = 0
    kinds: dict[str, int] = {}
    for i, (name, decode, valid) in enumerate(fuzz_inputs(rng)):
        if i >= n:
            break
        try:
            decode(mutate(valid, rng))
        except ProtocolError:
            pass
        except Exception as exc:  # the point of fuzzing: count whatever escapes the boundary
            failures += 1
            key = f"{name}:{type(exc).__name__}"
            kinds[key] = kinds.get(key, 0) + 1
    return n, failures, kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller vocab/layers and fewer fuzz cases")
    ap.add_argument("--fuzz", type=int, default=120_000)
    ap.add_argument("--protocol-fuzz", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    vocab, layers = (8192, 2) if args.quick else (151936, 24)
    n_fuzz = 5000 if args.quick else args.fuzz
    res: dict[str, Any] = {
        "model": f"qwen2-0.5b shapes (vocab {vocab}, {layers} layers)",
        "k": K,
        "chunk": CHUNK * CHUNK,
    }
    int8 = model_bytes("int8", vocab, layers, args.seed)
    sign = model_bytes("sign", vocab, layers, args.seed)
    res["n_params"] = int8["n_params"]
    res["bytes_per_param_int8"] = round(int8["bytes"] / int8["n_params"], 6)
    res["bytes_per_param_sign"] = round(sign["bytes"] / sign["n_params"], 6)
    res["payload_bytes_per_param_int8"] = round(int8["payload_bytes"] / int8["n_params"], 6)
    res["payload_bytes_per_param_sign"] = round(sign["payload_bytes"] / sign["n_params"], 6)
    res["messages_per_step"] = int8["messages"]
    res["step_bytes_int8"] = int8["bytes"]
    res["energy_ratio_random"] = round(int8["energy_ratio"], 5)
    res["index_bits"] = round(int8["index_bits"], 4)
    res["index_bits_bound"] = round(indices.index_bits_bound(K, CHUNK * CHUNK), 4)
    res["index_bits_ratio"] = round(res["index_bits"] / res["index_bits_bound"], 4)
    res["encode_decode_s_per_mparam"] = round(
        (int8["seconds"] + sign["seconds"]) / 2 / (int8["n_params"] / 1e6), 5
    )
    cmb, dmb, ratio = zstd_speed(8 if args.quick else 64)
    res["zstd_mb_s"] = round(cmb, 1)
    res["zstd_decompress_mb_s"] = round(dmb, 1)
    res["zstd_ratio_bf16_weights"] = round(ratio, 3)
    cases, failures, kinds = fuzz(n_fuzz, args.seed)
    pcases, pfail = 0, 0
    try:
        from swarmnode.protocol.fuzz import fuzz_decode
    except ImportError:
        fuzz_decode = None  # type: ignore[assignment]
    if fuzz_decode is not None:
        pcases, pfail = fuzz_decode(500 if args.quick else args.protocol_fuzz, args.seed)
    res["fuzz_cases"] = cases + pcases
    res["fuzz_failures"] = failures + pfail
    res["fuzz_cases_compression"] = cases
    res["fuzz_cases_protocol"] = pcases
    if kinds:
        res["fuzz_failure_kinds"] = kinds
    res["acceptance"] = {
        "bytes_per_param_int8<=0.017": res["bytes_per_param_int8"] <= 0.017,
        "bytes_per_param_sign<=0.010": res["bytes_per_param_sign"] <= 0.010,
        "index_bits<=1.1*bound": res["index_bits"] <= 1.1 * res["index_bits_bound"],
        "zero_fuzz_failures": res["fuzz_failures"] == 0,
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
