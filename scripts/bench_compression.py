"""Benchmark swarmnode.compression: DeMo payload size per parameter, index bits, speed, fuzzing.

Prints ONE JSON object. Sizes are measured on the parameter shapes of Qwen2-0.5B (24 layers,
hidden 896, MLP 4864, 2 KV heads of 64, vocab 151936, tied embedding) with top-32 per 4096-element
chunk, counting every byte of real `swarmnode.protocol` DemoComponents messages (codec.encode),
packed greedily under the gossip size limit. The embedding's components (~2.2 MB) exceed one
gossip message, so it is sent as row slabs of 4096 rows, each its own TensorComponents; slabs
are multiples of 64 rows, so the DCT tiles and the selected components are exactly those of the
whole matrix. The 24 layers share shapes, so one layer is coded and counted 24 times.

Section ``sparse_delta``: the sparse DiLoCo pseudo-gradient codec (``compression.sparsedelta``) on
Qwen2.5-0.5B layer shapes (hidden 896, MLP 4864, 2 KV heads of 64) at ``--sparse-params`` (default
50 M: 3 layers and a 6016-row embedding slice, every tensor generated, coded and dropped in turn),
real ``pseudograd`` blobs with every header byte counted, bytes/param and reconstruction cosine vs Δ
for three kinds of Δ (i.i.d. Gaussian; "adam": a sum of 30 sign steps of a shared direction plus
noise, soft-signed like AdamW's inner steps; "smooth": rank 4 of random walks plus 10 % noise), in the value domain
and with the DCT, and on a real AdamW Δ of the tiny model; error feedback over ``--sparse-rounds`` rounds on one layer (cosine of the sum
of what was sent vs the sum of the Δs); a DiLoCo learning proxy (4 replicas of a small MLP
through the real codec and merge: gain over isolated replicas per codec and outer step, a cheap
stand-in for bench_swarm); and a projection to the full 494 M layout (24 layers, the
151936 x 896 embedding) from the measured bytes of each tensor shape.

Usage: nice -n 10 python scripts/bench_compression.py [--quick] [--sparse-only]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import torch
from swarmnode.compression import components, dct, framing, indices, pseudograd, quant, sparsedelta, values
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


# -- sparse pseudo-gradients ------------------------------------------------------------------------

QWEN25_HIDDEN, QWEN25_INTER, QWEN25_KV, QWEN25_VOCAB, QWEN25_LAYERS = 896, 4864, 128, 151936, 24


def qwen25_layer(i: int) -> list[tuple[str, tuple[int, ...]]]:
    h, inter, kv = QWEN25_HIDDEN, QWEN25_INTER, QWEN25_KV
    layer, _ = qwen2_05b_shapes(0, 0)
    assert ("mlp.gate_proj.weight", (inter, h)) in layer
    assert ("self_attn.k_proj.weight", (kv, h)) in layer
    return [(f"model.layers.{i}.{n}", s) for n, s in layer]


def sparse_layout(n_params: float) -> list[tuple[str, tuple[int, ...]]]:
    """Whole Qwen2.5-0.5B layers, then an embedding slice (a multiple of 64 rows, like the full
    151936 rows) and the final norm, to about ``n_params``."""
    per_layer = sum(math.prod(s) for _, s in qwen25_layer(0))
    layers = max(1, int(n_params // per_layer))
    shapes = [t for i in range(layers) for t in qwen25_layer(i)]
    left = max(64 * QWEN25_HIDDEN, int(n_params) - layers * per_layer)
    rows = min(QWEN25_VOCAB, max(64, left // QWEN25_HIDDEN // 64 * 64))
    shapes += [("model.embed_tokens.weight", (rows, QWEN25_HIDDEN)), ("model.norm.weight", (QWEN25_HIDDEN,))]
    return sorted(shapes)


def full_layout() -> list[tuple[str, tuple[int, ...]]]:
    shapes = [t for i in range(QWEN25_LAYERS) for t in qwen25_layer(i)]
    shapes += [
        ("model.embed_tokens.weight", (QWEN25_VOCAB, QWEN25_HIDDEN)),
        ("model.norm.weight", (QWEN25_HIDDEN,)),
    ]
    return sorted(shapes)


def synthetic_delta(kind: str, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A Δ tensor of one kind, the same for the same (kind, name, seed)."""
    g = torch.Generator().manual_seed((zlib.crc32(name.encode()) + 7919 * seed) % 2**63)
    if kind == "gaussian":
        return torch.randn(shape, generator=g) * 1e-3
    if kind == "adam":
        # 10 inner steps of AdamW-like updates, lr · a soft sign of (shared direction + noise):
        # Adam's normalised steps are sign-like, but not exactly ±1
        direction = torch.randn(shape, generator=g)
        out = torch.zeros(shape)
        for _ in range(10):
            out.add_(torch.tanh(3.0 * (direction + 2.0 * torch.randn(shape, generator=g))), alpha=1e-5)
        return out
    if kind == "smooth":
        # rank 4 of random walks (smooth along both axes), plus 10 % i.i.d. noise: the structure a
        # DCT gathers into few coefficients
        rows = shape[0] if len(shape) >= 2 else 1
        cols = math.prod(shape) // rows
        u = torch.cumsum(torch.randn(rows, 4, generator=g), dim=0) / math.sqrt(rows)
        v = torch.cumsum(torch.randn(4, cols, generator=g), dim=1) / math.sqrt(cols)
        m = u @ v
        m = m / (float(m.std()) + 1e-12) + 0.1 * torch.randn(rows, cols, generator=g)
        return (m / (float(m.std()) + 1e-12) * 1e-3).reshape(shape)
    raise ValueError(kind)


def sparse_round(
    shapes: list[tuple[str, tuple[int, ...]]], kind: str, params: sparsedelta.SparseParams, seed: int
) -> dict[str, Any]:
    """One blob for a synthetic Δ over ``shapes``: bytes, cosine vs Δ, per-shape payload bytes."""
    gen_s = [0.0]

    def generated() -> Iterator[tuple[str, torch.Tensor]]:
        for n, s in shapes:
            t = time.perf_counter()
            x = synthetic_delta(kind, n, s, seed)
            gen_s[0] += time.perf_counter() - t
            yield n, x

    t0 = time.perf_counter()
    blob = pseudograd.encode_delta(generated(), "sparse", params=params)
    t_enc = time.perf_counter() - t0 - gen_s[0]  # generating the synthetic Δ is not coding it
    dot = nd = nx = 0.0
    decode_s = 0.0
    per_shape: dict[tuple[int, ...], int] = {}
    want = dict(shapes)
    norms = pseudograd.delta_sq_norms(blob, len(blob), shapes=want)
    it = pseudograd.iter_decode_delta(blob, len(blob), shapes=want)
    for name, shape in shapes:
        t2 = time.perf_counter()
        got_name, got = next(it)
        decode_s += time.perf_counter() - t2
        assert got_name == name
        x = synthetic_delta(kind, name, shape, seed)
        dot += float((x.double() * got.double()).sum())
        nd += float(got.double().pow(2).sum())
        nx += float(x.double().pow(2).sum())
    hlen = int.from_bytes(blob[5:9], "little")
    for name, shape, length in msgpack.unpackb(blob[9 : 9 + hlen])["t"]:
        del name
        per_shape.setdefault(tuple(shape), length)
    n_params = sum(math.prod(s) for _, s in shapes)
    return {
        "bytes": len(blob),
        "header_bytes": 9 + hlen,
        "bytes_per_param": len(blob) / n_params,
        "cosine": dot / math.sqrt(nd * nx),
        "norm_from_codes_vs_decoded": math.sqrt(sum(sq for *_, sq in norms) / nd),
        "encode_s_per_mparam": t_enc / (n_params / 1e6),
        "decode_s_per_mparam": decode_s / (n_params / 1e6),
        "per_shape": per_shape,
    }


def error_feedback_rounds(
    shapes: list[tuple[str, tuple[int, ...]]], rounds: int, params: sparsedelta.SparseParams, seed: int
) -> dict[str, float]:
    """R rounds of Δs: one "adam" Δ that persists plus fresh noise of twice its scale each round: cosine of Σ sent
    vs Σ Δ, with and without error feedback, and what is left in the residual."""
    want = dict(shapes)
    ef = sparsedelta.ErrorFeedback()
    sums: dict[str, dict[str, torch.Tensor]] = {"ef": {}, "no_ef": {}, "delta": {}}
    persistent = {n: synthetic_delta("adam", n, s, seed) for n, s in shapes}
    g = torch.Generator().manual_seed(seed)
    for _ in range(rounds):
        deltas = {n: p + 2e-5 * torch.randn(p.shape, generator=g) for n, p in persistent.items()}
        for key, fb in (("ef", ef), ("no_ef", None)):
            blob = pseudograd.encode_delta(sorted(deltas.items()), "sparse", params=params, feedback=fb)
            for n, t in pseudograd.iter_decode_delta(blob, len(blob), shapes=want):
                sums[key][n] = sums[key].get(n, torch.zeros(t.shape)) + t
        for n, t in deltas.items():
            sums["delta"][n] = sums["delta"].get(n, torch.zeros(t.shape)) + t

    def cos(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        num = sum(float((a[n].double() * b[n].double()).sum()) for n in a)
        return num / math.sqrt(
            sum(float(a[n].double().pow(2).sum()) for n in a)
            * sum(float(b[n].double().pow(2).sum()) for n in b)
        )

    total = math.sqrt(sum(float(t.double().pow(2).sum()) for t in sums["delta"].values()))
    return {
        "rounds": rounds,
        "n_params": sum(math.prod(s) for _, s in shapes),
        "cosine_sum_sent_vs_sum_delta_ef": round(cos(sums["ef"], sums["delta"]), 4),
        "cosine_sum_sent_vs_sum_delta_no_ef": round(cos(sums["no_ef"], sums["delta"]), 4),
        "residual_over_sum_delta": round(math.sqrt(ef.sq_norm()) / total, 4),
    }


def project_full(per_shape: dict[tuple[int, ...], int], params: sparsedelta.SparseParams) -> dict[str, float]:
    """Bytes of a 494 M-parameter blob from the measured payload of each shape (the embedding: its
    measured bytes per chunk times the full embedding's chunks) and an exact header."""
    entries = []
    total_payload = 0
    for name, shape in full_layout():
        if shape in per_shape:
            length = per_shape[shape]
        else:  # the full embedding: the slice's chunk geometry, more chunks
            (slice_shape,) = [
                s
                for s in per_shape
                if len(s) == 2
                and s[1] == QWEN25_HIDDEN
                and s[0] % 64 == 0
                and s[0] not in (QWEN25_HIDDEN, QWEN25_KV, QWEN25_INTER)
            ]
            g_slice = sparsedelta._Geom(slice_shape, params)
            g_full = sparsedelta._Geom(shape, params)
            assert (g_slice.chunk_numel, g_slice.k) == (g_full.chunk_numel, g_full.k)
            length = round(per_shape[slice_shape] * g_full.n_chunks / g_slice.n_chunks)
        entries.append([name, list(shape), length])
        total_payload += length
    head = msgpack.packb(
        {"codec": "sparse", "t": entries, "tile": params.tile, "k": params.k, "domain": params.domain},
        use_bin_type=True,
    )
    n = sum(math.prod(s) for _, s in full_layout())
    total = 9 + len(head) + total_payload
    return {
        "n_params": n,
        "bytes": total,
        "bytes_per_param": round(total / n, 6),
        "header_bytes": 9 + len(head),
    }


def tiny_model_delta(params: sparsedelta.SparseParams) -> dict[str, float]:
    """A real AdamW Δ: the tiny model after 60 warm-up steps minus after 20 (same seed, so the first
    20 steps are the same). 135 k parameters in small tensors: the header weighs more than at 50 M."""
    import tempfile
    from pathlib import Path

    from safetensors.torch import load_file

    from swarmnode.tinymodel import build_tiny_policy

    with tempfile.TemporaryDirectory() as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dirs = [build_tiny_policy(Path(tmp) / f"w{n}", warmup_steps=n) for n in (20, 60)]
        a, b = (load_file(next(Path(d).glob("*.safetensors"))) for d in dirs)
    delta = {n: a[n].float() - b[n].float() for n in sorted(a)}
    shapes = {n: tuple(t.shape) for n, t in delta.items()}
    blob = pseudograd.encode_delta(delta, "sparse", params=params)
    got = pseudograd.decode_delta(blob, len(blob), shapes=shapes)
    dot = sum(float((got[n].double() * delta[n].double()).sum()) for n in delta)
    nd = sum(float(t.double().pow(2).sum()) for t in got.values())
    nx = sum(float(t.double().pow(2).sum()) for t in delta.values())
    n_params = sum(t.numel() for t in delta.values())
    return {
        "n_params": n_params,
        "bytes_per_param": round(len(blob) / n_params, 6),
        "cosine": round(dot / math.sqrt(nd * nx), 4),
    }


def diloco_proxy(codec: str | None, *, seed: int, outer_lr: float, momentum: float) -> float:
    """Held-out MSE after 30 DiLoCo rounds of 25 AdamW steps on 4 replicas (an MLP of 98 k
    parameters regressing a random teacher from noisy samples, each replica its own stream), through
    the real codec, ``check_delta`` and ``merge`` (trimmed mean); ``codec=None``: no merges (isolated)."""
    from swarmnode.exchange.merge import Contribution, check_delta, merge
    from swarmnode.optim.diloco import DiLoCo

    torch.manual_seed(seed)
    d_in, d_h, d_out = 64, 256, 64
    teacher = torch.nn.Sequential(torch.nn.Linear(d_in, d_h), torch.nn.Tanh(), torch.nn.Linear(d_h, d_out))

    def student() -> torch.nn.Module:
        torch.manual_seed(seed + 1)
        return torch.nn.Sequential(
            torch.nn.Linear(d_in, d_h),
            torch.nn.Tanh(),
            torch.nn.Linear(d_h, d_h),
            torch.nn.Tanh(),
            torch.nn.Linear(d_h, d_out),
        )

    models = [student() for _ in range(4)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in models]
    dls = [DiLoCo(m.named_parameters(), lr=outer_lr, momentum=momentum) for m in models]
    gens = [torch.Generator().manual_seed(seed * 100 + 7 + i) for i in range(4)]
    x_test = torch.randn(4096, d_in, generator=torch.Generator().manual_seed(999))
    with torch.no_grad():
        y_test = teacher(x_test)
    for _ in range(30):
        for m, o, g in zip(models, opts, gens, strict=True):
            for _ in range(25):
                x = torch.randn(32, d_in, generator=g)
                with torch.no_grad():
                    y = teacher(x) + 0.5 * torch.randn(32, d_out, generator=g)
                loss = (m(x) - y).pow(2).mean()
                o.zero_grad()
                loss.backward()
                o.step()
        if codec is None:
            continue
        shapes = dls[0].shapes()
        cap = pseudograd.max_encoded_size(shapes)
        blobs = [d.encode_pseudo_gradient(codec) for d in dls]
        contribs = [Contribution(b, 1.0, check_delta(b, cap, shapes)) for b in blobs]
        for d in dls:
            merge(contribs, d, max_bytes=cap, max_weight=1.0, published_local=None)
    with torch.no_grad():
        return sum(float((m(x_test) - y_test).pow(2).mean()) for m in models) / len(models)


def diloco_proxy_section(seeds: tuple[int, ...] = (0, 1)) -> dict[str, Any]:
    """Gain over isolated replicas (MSE_isolated − MSE) per codec and outer step, and the sparse
    gain over int8's: a cheap stand-in for ``bench_swarm`` (the issue's learning-parity check)."""
    arms = {
        "int8_lr0.7_m0.9": ("int8", 0.7, 0.9),
        "int8_lr1_m0": ("int8", 1.0, 0.0),
        "sparse_lr1_m0": ("sparse", 1.0, 0.0),
        "sparse-dct_lr1_m0": ("sparse-dct", 1.0, 0.0),
        "sparse_lr0.7_m0.9": ("sparse", 0.7, 0.9),
    }
    out: dict[str, Any] = {}
    for seed in seeds:
        iso = diloco_proxy(None, seed=seed, outer_lr=1.0, momentum=0.0)
        row: dict[str, Any] = {"mse_isolated": round(iso, 6)}
        for name, (arm_codec, lr, mom) in arms.items():
            row[f"gain_{name}"] = round(
                iso - diloco_proxy(arm_codec, seed=seed, outer_lr=lr, momentum=mom), 6
            )
        row["sparse_gain_over_int8_default"] = round(
            row["gain_sparse_lr1_m0"] / row["gain_int8_lr0.7_m0.9"], 3
        )
        row["sparse_gain_over_int8_same_outer"] = round(
            row["gain_sparse_lr1_m0"] / row["gain_int8_lr1_m0"], 3
        )
        out[f"seed{seed}"] = row
    return out


def sparse_delta_section(n_params: float, rounds: int, seed: int) -> dict[str, Any]:
    shapes = sparse_layout(n_params)
    out: dict[str, Any] = {
        "layout": f"qwen2.5-0.5b shapes, {len(shapes)} tensors",
        "n_params": sum(math.prod(s) for _, s in shapes),
        "k_per_4096": sparsedelta.DEFAULT_K,
        "tile": sparsedelta.DEFAULT_TILE,
    }
    per_shape: dict[tuple[int, ...], int] = {}
    for dom in sparsedelta.DOMAINS:
        p = sparsedelta.SparseParams(domain=dom)
        for kind in ("gaussian", "adam", "smooth"):
            r = sparse_round(shapes, kind, p, seed)
            if dom == sparsedelta.DEFAULT_DOMAIN and kind == "adam":
                per_shape = r["per_shape"]
                out["bytes_per_param"] = round(r["bytes_per_param"], 6)
                out["bytes"] = r["bytes"]
                out["header_bytes"] = r["header_bytes"]
                out["encode_s_per_mparam"] = round(r["encode_s_per_mparam"], 4)
                out["decode_s_per_mparam"] = round(r["decode_s_per_mparam"], 4)
            out[f"{dom}_{kind}"] = {
                "bytes_per_param": round(r["bytes_per_param"], 6),
                "cosine": round(r["cosine"], 4),
                "norm_from_codes_vs_decoded": round(r["norm_from_codes_vs_decoded"], 6),
            }
        out[f"{dom}_tiny_model_delta"] = tiny_model_delta(p)
    out["projection_494m"] = project_full(per_shape, sparsedelta.SparseParams())
    ef_shapes = [(n, s) for n, s in shapes if n.startswith("model.layers.0.")]
    out["error_feedback"] = error_feedback_rounds(ef_shapes, rounds, sparsedelta.SparseParams(), seed)
    out["diloco_proxy"] = diloco_proxy_section()
    rows = [r for r in out["diloco_proxy"].values()]
    out["acceptance"] = {
        "proxy_sparse_gain>=0.9x_int8_default": all(r["sparse_gain_over_int8_default"] >= 0.9 for r in rows),
        "bytes_per_param<=0.02": out["bytes_per_param"] <= 0.02,
        "projected_494m_bytes_per_param<=0.02": out["projection_494m"]["bytes_per_param"] <= 0.02,
    }
    return out


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
    ap.add_argument("--sparse-params", type=float, default=50e6, help="sparse_delta: parameters coded")
    ap.add_argument("--sparse-rounds", type=int, default=20, help="sparse_delta: error-feedback rounds")
    ap.add_argument("--sparse-only", action="store_true", help="only the sparse_delta section")
    args = ap.parse_args()
    torch.set_num_threads(2)
    sparse = sparse_delta_section(
        2e7 if args.quick else args.sparse_params, 5 if args.quick else args.sparse_rounds, args.seed
    )
    if args.sparse_only:
        print(json.dumps({"sparse_delta": sparse}))
        return
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
    res["sparse_delta"] = sparse
    print(json.dumps(res))


if __name__ == "__main__":
    main()
