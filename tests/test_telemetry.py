"""Telemetry against a real MQTT broker on 127.0.0.1 (mosquitto, else amqtt), and a dead one."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from swarmnode.telemetry import MqttSink, NullSink, open_telemetry, parse_mqtt_url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited early with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"broker did not listen on {port} within {timeout}s")


def _start_broker(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    mosquitto = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )
    if mosquitto:
        conf = tmp / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        cmd = [mosquitto, "-c", str(conf)]
    else:
        conf = tmp / "amqtt.yaml"
        conf.write_text(f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\n")
        cmd = [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(conf)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc)
    except BaseException:
        proc.kill()
        proc.wait(timeout=5)
        raise
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[int]:
    port = _free_port()
    proc = _start_broker(tmp_path, port)
    try:
        yield port
    finally:
        _stop(proc)


def test_parse_url() -> None:
    t = parse_mqtt_url("mqtt://127.0.0.1:1884/lab/node1")
    assert (t.host, t.port, t.prefix) == ("127.0.0.1", 1884, "lab/node1")
    assert parse_mqtt_url("mqtt://broker").port == 1883
    with pytest.raises(ValueError, match="mqtt://"):
        parse_mqtt_url("http://broker:1883")


def test_null_sink_accepts_everything() -> None:
    async def main() -> dict[str, object]:
        async with open_telemetry(None) as sink:
            assert isinstance(sink, NullSink)
            await sink.publish("metrics", {"step": 1})
            return sink.statistics()

    assert asyncio.run(main())["published"] == 0


@pytest.mark.timeout(30)
def test_payloads_arrive_at_real_broker(broker: int) -> None:
    async def main() -> list[tuple[str, dict[str, object]]]:
        got: list[tuple[str, dict[str, object]]] = []
        async with aiomqtt.Client("127.0.0.1", broker) as sub:
            await sub.subscribe("lab/#")
            async with open_telemetry(f"mqtt://127.0.0.1:{broker}/lab") as sink:
                assert isinstance(sink, MqttSink)
                async with asyncio.timeout(5):
                    await sink.wait_connected()
                for step in range(3):
                    await sink.publish("metrics", {"step": step, "reward": 0.5, "eval": float("nan")})
                async with asyncio.timeout(5):
                    async for msg in sub.messages:
                        got.append((str(msg.topic), json.loads(bytes(msg.payload))))  # type: ignore[arg-type]
                        if len(got) == 3:
                            break
                stats = sink.statistics()
        assert stats["published"] == 3
        assert stats["dropped"] == 0
        return got

    got = asyncio.run(main())
    assert [t for t, _ in got] == ["lab/metrics"] * 3
    assert [p["step"] for _, p in got] == [0, 1, 2]
    assert got[0][1]["eval"] is None  # NaN goes out as null: strict JSON


@pytest.mark.timeout(30)
def test_dead_broker_never_raises_and_counts_drops() -> None:
    port = _free_port()  # nothing listens here

    async def main() -> dict[str, object]:
        async with open_telemetry(f"mqtt://127.0.0.1:{port}/x") as sink:
            assert isinstance(sink, MqttSink)
            t0 = time.monotonic()
            for i in range(2000):
                await sink.publish("metrics", {"i": i})
            assert time.monotonic() - t0 < 1.0  # enqueue only: never waits on the broker
            await asyncio.sleep(0.3)
            return sink.statistics()

    t0 = time.monotonic()
    stats = asyncio.run(main())
    assert time.monotonic() - t0 < 5.0  # closing does not hang on the dead broker
    assert stats["connected"] is False
    assert stats["published"] == 0
    assert stats["dropped"] == 2000 - stats["pending"]
    assert stats["errors"] >= 1


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_reconnects_after_broker_restart(tmp_path: Path) -> None:
    port = _free_port()
    proc = _start_broker(tmp_path, port)

    async def main() -> dict[str, object]:
        nonlocal proc
        async with open_telemetry(f"mqtt://127.0.0.1:{port}/r") as sink:
            assert isinstance(sink, MqttSink)
            async with asyncio.timeout(5):
                await sink.wait_connected()
            await sink.publish("m", {"phase": "before"})
            async with asyncio.timeout(5):
                await sink.wait_flushed()
            await asyncio.to_thread(_stop, proc)
            await sink.publish("m", {"phase": "down"})  # must not raise
            proc = await asyncio.to_thread(_start_broker, tmp_path, port)
            async with aiomqtt.Client("127.0.0.1", port) as sub:
                await sub.subscribe("r/#")
                async with asyncio.timeout(20):
                    while True:
                        await sink.publish("m", {"phase": "after"})
                        try:
                            async with asyncio.timeout(1):
                                msg = await anext(aiter(sub.messages))
                        except TimeoutError:
                            continue
                        if json.loads(bytes(msg.payload))["phase"] == "after":  # type: ignore[arg-type]
                            break
            return sink.statistics()

    try:
        stats = asyncio.run(main())
    finally:
        _stop(proc)
    assert stats["reconnects"] >= 1
    assert stats["published"] >= 2


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_daemon_publishes_steps_to_mqtt(broker: int, tmp_path: Path, tiny_policy_dir: Path) -> None:
    """`swarmnode run --mqtt …`: every training step reaches a real broker as JSON."""

    async def main() -> list[dict[str, object]]:
        got: list[dict[str, object]] = []
        async with aiomqtt.Client("127.0.0.1", broker) as sub:
            await sub.subscribe("lab/node/+/step")
            proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; stopped by PID below
                [sys.executable, "-m", "swarmnode.cli", "run", "--model", str(tiny_policy_dir),
                 "--data-dir", str(tmp_path / "node"), "--steps", "3", "--no-diloco", "--group-size", "2",
                 "--local-groups", "1", "--external-groups", "0", "--max-new-tokens", "4",
                 "--eval-every", "100", "--mqtt", f"mqtt://127.0.0.1:{broker}/lab"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                async with asyncio.timeout(180):
                    async for msg in sub.messages:
                        got.append(json.loads(bytes(msg.payload)))  # type: ignore[arg-type]
                        if len(got) == 3:
                            break
            finally:
                _stop(proc)
        return got

    rows = asyncio.run(main())
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all("reward" in r for r in rows)
