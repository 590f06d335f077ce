"""A real-size cohort end to end: Qwen2.5-0.5B's exact shape, 2 nodes + a late joiner; prints ONE JSON object.

The model is built here, with random weights and the built-in tokenizer (nothing is downloaded): the
configuration of Qwen2.5-0.5B (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, vocab 151,936,
tied embeddings: 494 M parameters), saved as a normal HF model directory in bfloat16. Two
`swarmnode run` processes train it with DeMo (components gossiped every step) and DiLoCo rounds of
H inner steps; once they have merged `--join-round` rounds a third node starts with no state, catches
up from them over the chunked state stream and trains on to the end.

Choices for this 2-core, 24 GB machine (all three processes must fit together): bfloat16 weights,
groups of 4 completions, 2 groups per step, 8 new tokens, one torch thread per node, DiLoCo with
outer lr 1.0 and no outer momentum (the DeMo setting bench_swarm recommends; it also means the
state a joiner pulls is the 2 GB fp32 anchor alone).

    python scripts/bench_realsize.py --out runs/bench-realsize
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from swarmnode.localswarm import MULTIADDR_PREFIX
from swarmnode.swarmreport import read_metrics

QWEN25_05B = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 151_936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32_768,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
}
SIZE_WARNING = re.compile(r"(over (its|the)? ?(limit|cap|ceiling)|exceeds|too (big|large)|not sent)", re.I)


def build_model(out: Path) -> int:
    """The Qwen2.5-0.5B-shaped model dir (reused when present); returns its parameter count."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from swarmnode.tinymodel import build_tokenizer

    info = out / "realsize.json"
    if info.is_file() and (out / "model.safetensors").is_file():
        return int(json.loads(info.read_text())["params"])
    tok = build_tokenizer()
    cfg = Qwen2Config(
        **QWEN25_05B,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM._from_config(cfg, torch_dtype=torch.bfloat16)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    params = sum(p.numel() for p in model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info.write_text(json.dumps({"params": params, "config": QWEN25_05B}))
    return params


class Proc:
    def __init__(self, index: int, cmd: list[str], data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.index, self.data_dir = index, data_dir
        self.log = (data_dir / "node.log").open("w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env.setdefault("MALLOC_ARENA_MAX", "2")  # glibc: fewer per-thread arenas holding freed GBs
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, text=True)
        self.peak_rss = 0
        self.peak_anon = 0  # anonymous memory only: the spilled anchor's file pages can be paged out

    def poll_rss(self) -> None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss = max(self.peak_rss, int(line.split()[1]) * 1024)
                if line.startswith("RssAnon:"):
                    self.peak_anon = max(self.peak_anon, int(line.split()[1]) * 1024)
        except OSError:
            pass

    def rows(self) -> list[dict[str, Any]]:
        return read_metrics(self.data_dir / "metrics.jsonl")

    def multiaddr(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in (self.data_dir / "node.log").read_text(errors="replace").splitlines():
                if line.startswith(MULTIADDR_PREFIX):
                    return line[len(MULTIADDR_PREFIX) :].strip()
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        tail = (self.data_dir / "node.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"node {self.index} did not start:\n{tail}")


def node_cmd(
    args: argparse.Namespace, model: Path, data_dir: Path, seed: int, bootstrap: str, peers: int
) -> list[str]:
    cmd = [sys.executable, "-m", "swarmnode.cli", "run", "--data-dir", str(data_dir)]
    cmd += ["--listen", "/ip4/127.0.0.1/tcp/0", "--swarm", "realsize", "--seed", str(seed)]
    cmd += ["--model", str(model), "--dtype", "bfloat16", "--family", "reverse"]
    cmd += ["--optimizer", "demo", "--lr", "1e-5", "--diloco", "--inner-steps", str(args.inner_steps)]
    cmd += ["--outer-lr", "1.0", "--outer-momentum", "0"]
    # A step waits up to this long until one peer's whole step of components is in (steps take about a
    # minute here, a merge holds a node's next step back by another, and the nodes drift apart).
    cmd += ["--demo-window", str(args.demo_window)]
    cmd += ["--group-size", "4", "--local-groups", "2", "--external-groups", "0", "--max-new-tokens", "8"]
    cmd += [
        "--eval-every",
        "1000",
        "--eval-prompts",
        "4",
        "--checkpoint-every",
        "0",
        "--steps",
        str(args.steps),
    ]
    cmd += ["--expect-peers", str(peers), "--join-wait", "600", "--link-mbps", str(args.link_mbps)]
    if bootstrap:
        cmd += ["--bootstrap", bootstrap]
    return cmd


def summarize(params: int, procs: list[Proc], joined_at: float | None, t0: float) -> dict[str, Any]:
    rows = [p.rows() for p in procs]
    step_s = [r["step_s"] for rr in rows[:2] for r in rr[1:] if r.get("step_s")]
    demo_bytes = [r["demo_bytes_per_step"] for rr in rows for r in rr if r.get("demo_bytes_per_step")]
    # Peers whose components each step applied (the last metrics row of each step, after the first),
    # over the steps during which some other node was still training (the joiner's last steps may
    # run after the first two nodes finished: nobody is left to hear from then).
    last_seen = [max((float(r.get("time", 0)) for r in rr), default=0.0) for rr in rows]
    peers_per_step: list[int] = []
    zero_steps: list[list[int]] = []
    alone_steps: list[list[int]] = []
    for i, rr in enumerate(rows):
        by_step = {int(r["step"]): r for r in rr if "demo_peers_last_step" in r}
        first = min(by_step, default=0)
        zero_steps.append([])
        alone_steps.append([])
        for step, r in sorted(by_step.items()):
            if step == first:
                continue
            began = float(r.get("time", 0)) - float(r.get("step_s") or 0)
            if not any(t >= began for j, t in enumerate(last_seen) if j != i):
                alone_steps[i].append(step)
                continue
            peers_per_step.append(int(r["demo_peers_last_step"]))
            if not peers_per_step[-1]:
                zero_steps[i].append(step)
    # per round: (contributors, anchor, own) of every node that merged it
    merged: dict[int, list[tuple[int, str, bool]]] = {}
    for rr in rows:
        last = 0
        for r in rr:
            m = r.get("merges", 0)
            if m and m != last and r.get("round") is not None:
                merged.setdefault(int(r["round"]), []).append(
                    (
                        int(r.get("merge_contributors", 0)),
                        r.get("anchor_hash", ""),
                        bool(r.get("diloco_merged_own")),
                    )
                )
            last = m
    all_contrib = equal = 0
    for _rnd, entries in sorted(merged.items()):
        publishers = sum(1 for _, _, own in entries if own)
        all_contrib += sum(1 for c, _, _ in entries if c == publishers)
        equal += len({a for _, a, _ in entries}) == 1
    joiner = rows[2] if len(rows) > 2 else []
    caught = [r for r in joiner if r.get("catchups", 0) > 0]
    joiner_contributed = any(r.get("diloco_merged_own") for r in caught)
    warnings = 0
    for p in procs:
        for line in (p.data_dir / "node.log").read_text(errors="replace").splitlines():
            if ("WARNING" in line or "ERROR" in line) and SIZE_WARNING.search(line):
                warnings += 1
    last = [rr[-1] if rr else {} for rr in rows]
    return {
        "params": params,
        "nodes": len(procs),
        "dtype": "bfloat16",
        "step_s": round(sum(step_s) / len(step_s), 2) if step_s else None,
        "demo_bytes_per_step": round(sum(demo_bytes) / len(demo_bytes)) if demo_bytes else 0,
        "demo_messages_per_step": max(
            (r.get("demo_messages_per_step", 0) for rr in rows for r in rr), default=0
        ),
        "demo_peers_used_mean": round(sum(peers_per_step) / len(peers_per_step), 3) if peers_per_step else 0,
        "demo_peers_used_min_after_first": min(peers_per_step) if peers_per_step else 0,
        "demo_steps_without_peers": zero_steps,
        "demo_steps_with_no_peer_running": alone_steps,
        "demo_send_failures": sum(r.get("demo_send_failures", 0) for r in last),
        "delta_bytes_per_round": max((r.get("diloco_delta_bytes", 0) for r in last), default=0),
        "delta_bytes_per_param": round(
            max((r.get("diloco_delta_bytes", 0) for r in last), default=0) / params, 4
        ),
        "rounds_merged": len(merged),
        "merges": sum(len(v) for v in merged.values()),
        "merges_with_all_contributors": all_contrib,
        "anchors_equal_after_each_merge": equal == len(merged) and bool(merged),
        "rounds_with_equal_anchors": equal,
        "final_anchors_equal": len({r.get("anchor_hash") for r in last if r}) == 1,
        "incomplete_rounds": [r.get("diloco_incomplete_rounds", 0) for r in last],
        "diloco_health": [r.get("diloco_health", "") for r in last],
        "joined_at_s": round(joined_at - t0, 1) if joined_at else None,
        "joiner_caught_up": bool(caught),
        "catchup_s": caught[0].get("catchup_s") if caught else None,
        "joiner_contributed_after_catchup": joiner_contributed,
        "size_warnings": warnings,
        "peak_rss_gb": [round(p.peak_rss / 2**30, 2) for p in procs],
        "peak_rss_gb_total": round(sum(p.peak_rss for p in procs) / 2**30, 2),
        "peak_anon_gb": [round(p.peak_anon / 2**30, 2) for p in procs],
        "wall_s": round(time.monotonic() - t0, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-realsize"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--inner-steps", type=int, default=2)
    ap.add_argument("--join-round", type=int, default=2, help="the joiner starts once this round merged")
    ap.add_argument("--link-mbps", type=float, default=100.0)
    ap.add_argument(
        "--demo-window",
        type=float,
        default=180.0,
        help="seconds a step waits for one peer's whole step of DeMo components",
    )
    ap.add_argument("--timeout", type=float, default=3000.0)
    args = ap.parse_args()
    model = args.out / "model"
    t_build = time.monotonic()
    params = build_model(model)
    print(f"model: {params} parameters, built in {time.monotonic() - t_build:.0f}s", file=sys.stderr)
    for d in ("node0", "node1", "node2"):
        if (args.out / d).exists():
            import shutil

            shutil.rmtree(args.out / d)
    t0 = time.monotonic()
    procs = [Proc(0, node_cmd(args, model, args.out / "node0", 0, "", 1), args.out / "node0")]
    joined_at = None
    try:
        boot = procs[0].multiaddr(600)
        procs.append(Proc(1, node_cmd(args, model, args.out / "node1", 1, boot, 1), args.out / "node1"))
        deadline = t0 + args.timeout
        while time.monotonic() < deadline:
            for p in procs:
                p.poll_rss()
            if joined_at is None:
                rnd = max((r.get("round", 0) for r in procs[0].rows()), default=0)
                if rnd >= args.join_round:
                    cmd = node_cmd(args, model, args.out / "node2", 2, boot, 2)
                    procs.append(Proc(2, cmd, args.out / "node2"))
                    joined_at = time.monotonic()
                    print(f"joiner started at round {rnd}", file=sys.stderr)
            if all(p.proc.poll() is not None for p in procs) and joined_at is not None:
                break
            if procs[0].proc.poll() is not None and joined_at is None:
                break
            time.sleep(2.0)
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.proc.kill()
            p.log.close()
    result = summarize(params, procs, joined_at, t0)
    result["exit_codes"] = [p.proc.returncode for p in procs]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
