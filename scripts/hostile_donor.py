"""A malicious state donor against a real bootstrap-only joiner (the attack bench_hostile.py skipped).

    python scripts/hostile_donor.py [--out DIR] [--attack-seconds 75] [--poison zeros|scale100]
                                    [--sybils 3] [--optimizer adamw|demo]

The attacker is a swarmnode host (``swarmnode.p2p.open_host``) that serves a catch-up state over the
real state protocol: the real ``StateServer`` and ``snapshot_of`` on a real ``DiLoCo`` built from the
tiny model's own parameters with poisoned values (all zero, or scaled x100). Names, shapes, dtypes,
finiteness, the index's chunk digests and the anchor hash are all correct, so every structural check
of the joiner passes; only trust can stop it. Every second it publishes a presence, signed by its own
key, in the victims' cohort, a few rounds ahead of the newest round it hears (step = round x H, so
``trust.check_claim`` finds it plausible), carrying the anchor hash the poisoned snapshot really has:
a victim that asks for the state manifest gets a consistent, well-hashed state. Optionally Sybil
identities (keys relayed by the attacker's host) announce the same state.

``attack_malicious_donor`` starts a FRESH ``swarmnode run`` joiner (bench_hostile's ``Victim``) whose
only bootstrap is the attacker, lets it run while the attacker serves, and reports what was sent, how
many state requests were served, what the victim counted (``catchup*`` counters of its
metrics.jsonl), its catch-up log lines, whether it stayed alive, and harm: its anchor ever equal to
the poisoned one, its weights replaced (a catch-up or probed/attested load), its step jumping.

Expected (``swarmnode.trust``): one donor on one network is unattested (Sybils relayed through it
have no connection of their own and add no network group), so the joiner pulls it, probes it
(held-out greedy accuracy vs its own weights), refuses it, rolls back and trains from its own model;
the refused anchor is never pulled again. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import re
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import torch

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from bench_hostile import INNER_STEPS, SWARM, Attacker, Victim  # noqa: E402
from bench_hostile import _presence as bench_presence  # noqa: E402

# value -> poisoned value, per parameter tensor: finite, right shape and dtype, useless weights
POISONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "zeros": torch.zeros_like,
    "scale100": lambda t: t * 100.0,
}
LOG_MARKERS = ("catch-up", "caught up", "re-synced", "state manifests asked", "probe")
PROBE_RE = re.compile(r"held-out reward (\S+) vs ours (\S+)")

SybilPublish = Callable[[int, str, bytes], Awaitable[None]]


def poisoned_diloco(model_dir: str | Path, poison: str) -> tuple[Any, str]:
    """A DiLoCo outer optimiser over the tiny model's parameters with poisoned values, and the
    model's cohort fingerprint (what a victim running the same model is in)."""
    from swarmnode.optim.diloco import DiLoCo
    from swarmnode.policy import load_policy

    if poison not in POISONS:
        raise ValueError(f"unknown poison {poison!r}; choose from {sorted(POISONS)}")
    policy = load_policy(str(model_dir), device="cpu")
    params = list(policy.model.named_parameters())  # as swarmnode.build builds the victim's DiLoCo
    with torch.no_grad():
        for _, p in params:
            p.copy_(POISONS[poison](p.detach()))
    diloco = DiLoCo(params)  # lr / momentum are the victim's own: a loaded state keeps them
    for name, t in diloco.anchor.items():
        if not bool(torch.isfinite(t).all()):
            raise RuntimeError(f"poison {poison!r} made {name} non-finite: it would only test the NaN check")
    return diloco, str(policy.fingerprint)


def _presence(
    peer: str, *, swarm: str, cohort: str, rnd: int, step: int, anchor: str, addrs: Sequence[str]
) -> bytes:
    """The donor's claimed state (4 groups a step, like the victims' --local-groups)."""
    return bench_presence(
        peer, cohort, rnd, step, anchor, addrs=addrs, swarm=swarm, samples=step * 4, step_s=0.1
    )


async def serve_poisoned_state(
    host: Any,
    *,
    swarm: str,
    cohort: str,
    model_dir: str | Path,
    round_: int,
    step: int,
    stop: asyncio.Event,
    sybil_publish: SybilPublish | None = None,
    sybil_ids: Sequence[str] = (),
    poison: str = "zeros",
    inner_steps: int = INNER_STEPS,
    ahead: int = 3,
    interval_s: float = 1.0,
    ready: asyncio.Event | None = None,
    info: dict[str, Any] | None = None,
) -> dict[str, int]:
    """Serve a poisoned but well-formed catch-up state from ``host`` until ``stop`` is set.

    The state is announced at round ``round_`` (step ``step``), or ``ahead`` rounds past the newest
    round heard from ``cohort``'s peers, whichever is newer (the step keeps its offset from
    round x ``inner_steps``); the served snapshot always says the same round and step as the
    presence. ``sybil_publish(i, topic, data)`` with ``sybil_ids`` (bench_hostile's
    ``Attacker.publish_as`` / ``make_sybils``) makes those identities announce it too. ``ready`` is
    set once the handler is registered and the first presence is out; ``info`` receives the poisoned
    anchor hash and the claimed round. Returns counters."""
    from swarmnode.protocol import Presence, codec, topics

    from swarmnode.exchange.catchup import STATE_PROTOCOL, StateServer, snapshot_of

    if sybil_ids and sybil_publish is None:
        raise ValueError("sybil_ids need sybil_publish to publish as them")
    offset = step - round_ * inner_steps
    if not 0 <= offset <= 2 * inner_steps:
        raise ValueError(
            f"step {step} does not fit round {round_} (H={inner_steps}): victims refuse it as a claim, "
            "which is another attack"
        )
    diloco, fingerprint = await asyncio.to_thread(poisoned_diloco, model_dir, poison)
    if fingerprint != cohort:
        raise ValueError(f"{model_dir} is cohort {fingerprint[:16]}, not {cohort[:16]}: nobody would load it")
    base = await asyncio.to_thread(snapshot_of, diloco, round=round_, step=step)
    server = StateServer(host, cohort)
    server.update(base)
    counts = {
        "presences": 0,
        "sybil_presences": 0,
        "state_requests": 0,  # every request on the state protocol
        "state_requests_served": 0,  # answered with our manifest (the victims' cohort)
        "heard_presences": 0,
        "claimed_round": round_,
    }
    requesters: set[str] = set()

    async def handle(peer: str, data: bytes) -> bytes:
        counts["state_requests"] += 1
        requesters.add(peer)
        answer = await server.handle(peer, data)
        counts["state_requests_served"] = server.served
        return answer

    host.set_request_handler(STATE_PROTOCOL, handle)
    if info is not None:
        info.update(anchor_hash=base.anchor_hash, poison=poison, tensors=len(base.index.tensors))

    topic = topics.topic(swarm, topics.PRESENCE)
    heard_round = -1
    ours = {str(host.peer_id), *sybil_ids}
    sub = host.subscribe(topic)

    async def listen() -> None:
        nonlocal heard_round
        async for msg in sub:
            try:
                rec = codec.decode(msg.data)
            except Exception:
                continue
            if isinstance(rec, Presence) and rec.cohort == cohort and msg.origin not in ours:
                counts["heard_presences"] += 1
                heard_round = max(heard_round, int(rec.round))

    listener = asyncio.create_task(listen())
    claimed = round_
    try:
        while not stop.is_set():
            want = max(round_, heard_round + ahead)
            if want != claimed:  # the snapshot must say what the presence says
                claimed = want
                server.update(dataclasses.replace(base, round=claimed, step=claimed * inner_steps + offset))
            counts["claimed_round"] = claimed
            cstep = claimed * inner_steps + offset

            def presence(peer: str, addrs: Sequence[str], rnd: int = claimed, s: int = cstep) -> bytes:
                return _presence(
                    peer, swarm=swarm, cohort=cohort, rnd=rnd, step=s, anchor=base.anchor_hash, addrs=addrs
                )

            await host.publish(topic, presence(str(host.peer_id), host.listen_addrs))
            counts["presences"] += 1
            if sybil_publish is not None:
                for i, pid in enumerate(sybil_ids):
                    await sybil_publish(i, topic, presence(pid, []))
                    counts["sybil_presences"] += 1
            if ready is not None:
                ready.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        await sub.aclose()
    counts["state_requests_served"] = server.served
    counts["requesting_peers"] = len(requesters)
    blobs = host.statistics().get("blobs", {})
    counts["blob_requests_served"] = int(blobs.get("served_requests", 0))
    counts["blob_bytes_served"] = int(blobs.get("served_bytes", 0))
    if info is not None:
        info["requesters"] = sorted(requesters)
    return counts


def _all_rows(v: Victim) -> list[dict[str, Any]]:
    path = v.dir / "metrics.jsonl"
    out: list[dict[str, Any]] = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def _log_lines(v: Victim, limit: int = 16) -> list[str]:
    path = v.dir / "node.log"
    if not path.exists():
        return []
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if any(m in ln for m in LOG_MARKERS)]
    return [ln[:400] for ln in lines[:limit]]


def _mean(xs: Sequence[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


async def attack_malicious_donor(
    out: Path,
    *,
    attack_s: float = 75.0,
    poison: str = "zeros",
    sybils: int = 3,
    optimizer: str = "adamw",
    round_: int = 5,
    index: int = 0,
) -> dict[str, Any]:
    """A fresh joiner bootstrapped only to the attacker, ``attack_s`` seconds of the attacker serving
    a poisoned state (``serve_poisoned_state``); what was sent, what the joiner counted, harm."""
    from swarmnode.p2p import HostConfig, open_host
    from swarmnode.policy import load_policy
    from swarmnode.tinymodel import build_tiny_policy

    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    # the victim builds its tiny model in <data dir>/../tiny-model: the same directory, built first
    model_dir = await asyncio.to_thread(build_tiny_policy, out / "tiny-model", family="reverse")
    cohort = str((await asyncio.to_thread(load_policy, str(model_dir), device="cpu")).fingerprint)
    report: dict[str, Any] = {"attack": "malicious_state_donor", "poison": poison, "out": str(out)}
    info: dict[str, Any] = {}
    async with open_host(HostConfig(data_dir=out / "attacker-donor")) as host:
        if not host.listen_addrs:
            raise RuntimeError("the attacker's host has no listen address for the joiner to bootstrap from")
        attacker = Attacker(host)
        ids = attacker.make_sybils(sybils) if sybils else []
        stop, ready = asyncio.Event(), asyncio.Event()
        serving = asyncio.create_task(
            serve_poisoned_state(
                host,
                swarm=SWARM,
                cohort=cohort,
                model_dir=model_dir,
                round_=round_,
                step=round_ * INNER_STEPS,
                stop=stop,
                sybil_publish=attacker.publish_as if ids else None,
                sybil_ids=ids,
                poison=poison,
                ready=ready,
                info=info,
            )
        )
        waiting = asyncio.create_task(ready.wait())
        await asyncio.wait([serving, waiting], return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if not ready.is_set():
            serving.result()  # the attacker failed before serving: raise its error
            raise RuntimeError("the poisoned-state server ended before it was ready")
        # the victim's run outlasts the window: it must still be running when we judge it
        victim = Victim(index, out, host.listen_addrs[0], optimizer, attack_s + 120.0)
        alive = False
        t0 = time.monotonic()
        try:
            await asyncio.to_thread(victim.multiaddr)
            t_started = time.monotonic()
            exited = asyncio.create_task(asyncio.to_thread(victim.proc.wait))  # returns once it stops
            await asyncio.wait([exited, serving], timeout=attack_s, return_when=asyncio.FIRST_COMPLETED)
            alive = victim.alive()
            report["victim_started_after_s"] = round(t_started - t0, 1)
        finally:
            report["victim_exit_code"] = victim.stop()
            stop.set()
            sent = await serving
    report["attack_seconds"] = attack_s
    report["sybil_identities"] = len(ids)
    report["poisoned_anchor"] = info.get("anchor_hash", "")
    report["sent"] = sent
    report["victim_alive"] = alive

    rows = _all_rows(victim)
    steps = [r for r in rows if isinstance(r.get("step"), int) and "reward" in r]
    last = steps[-1] if steps else (rows[-1] if rows else {})
    counted = {k: v for k, v in last.items() if k.startswith("catchup")}
    for k in (
        "catchups",
        "heals",
        "merges",
        "round",
        "step",
        "anchor_hash",
        "diloco_incomplete_rounds",
        "diloco_health",
        "cohort_peers",
        "peers",
    ):
        if k in last:
            counted[k] = last[k]
    report["victim_counted"] = counted
    report["victim_rows"] = len(steps)
    lines = _log_lines(victim)
    report["victim_log"] = lines
    probes = [m.groups() for ln in lines if (m := PROBE_RE.search(ln))]
    if probes:
        report["probe_held_out"] = [{"candidate": c, "ours": o.rstrip(")")} for c, o in probes]

    poisoned = report["poisoned_anchor"]
    gaps = [b["step"] - a["step"] for a, b in itertools.pairwise(steps)]
    loads = int(last.get("catchup/attested_loads", 0) or 0) + int(last.get("catchup/probed_loads", 0) or 0)
    rewards = [float(r["reward"]) for r in steps if isinstance(r.get("reward"), int | float)]
    harm = {
        "anchor_ever_poisoned": any(r.get("anchor_hash") == poisoned for r in rows) if poisoned else None,
        "weights_replaced": int(last.get("catchups", 0) or 0) > 0 or loads > 0,
        "step_jump": any(g > 1 for g in gaps),
        "max_step_gap": max(gaps, default=0),
        "reward_first_last_20": [_mean(rewards[:20]), _mean(rewards[-20:])],
    }
    harm["any"] = bool(
        harm["anchor_ever_poisoned"] or harm["weights_replaced"] or harm["step_jump"] or not alive
    )
    report["harmed"] = harm
    if sent["state_requests_served"] == 0:
        report["note"] = (
            "the joiner never asked the attacker for its state manifest: the attack did not reach the "
            "catch-up path (see victim_log)"
        )
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--attack-seconds", type=float, default=75.0, help="how long the joiner runs (s)")
    ap.add_argument("--poison", choices=sorted(POISONS), default="zeros")
    ap.add_argument("--sybils", type=int, default=3, help="Sybil identities announcing the same state")
    ap.add_argument("--optimizer", choices=("adamw", "demo"), default="adamw")
    ap.add_argument("--round", type=int, default=5, help="the round the state claims at least")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="hostile-donor-"))
    report = asyncio.run(
        attack_malicious_donor(
            out,
            attack_s=args.attack_seconds,
            poison=args.poison,
            sybils=args.sybils,
            optimizer=args.optimizer,
            round_=args.round,
        )
    )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
