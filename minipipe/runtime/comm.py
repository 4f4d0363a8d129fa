"""Point-to-point messages between stages, the same on gloo and NCCL.

Sends are posted without waiting and their handles kept until :meth:`P2P.flush`; receives
are waited for before the action that needs them. With ``staged=True`` (gloo with CUDA
compute) tensors go through host memory. ``MINIPIPE_TRACE=1`` prints every message as
``rank 0 | step 1 | send activation mb 0 (stage 0) → 1 [4, 16] float32``.

Channels: every stage boundary that crosses ranks carries two independent first-in-first-out
channels, the activations of stage ``s`` (to ``s + 1``) and the gradients of stage ``s + 1``
(to ``s``), as :mod:`minipipe.validate` models them. On gloo each channel is a tag (messages
are matched by sender and tag, in order); on NCCL, which ignores tags and runs a
communicator's operations in posting order, each channel is its own two-rank process group
(``channel_groups``). So a V placement, where one pair of ranks exchanges the activations of
one stage and the gradients of another both ways, needs no global message order.

Receives posted ahead (gloo): a step sends the same messages in the same order as the one
before, so :class:`P2P` records the receives of the first step and, from the second step
on, posts each one ``lookahead`` messages early (per channel), before its data arrives.
A message that finds its receive already posted lands straight in the buffer; one that
arrives first waits for a handshake, which costs a thread wake-up on each side — about a
millisecond per message on a busy CPU. ``MINIPIPE_LOOKAHEAD=0`` turns this off.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..structure import Signature
from ..validate import Message

__all__ = ["P2P", "TensorMeta", "SENDABLE", "channel_tag", "channel_groups"]

_SIG_BYTES = 1024  # a boundary's signature (structure, dtypes, shapes) as JSON, zero-padded
SENDABLE = {torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
            torch.bool, torch.uint8}


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of a boundary tensor (learned once per stage edge, then reused)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _key(msg: Message, part: int = 0) -> tuple[str, int, int, int]:
    return (msg.kind, msg.stage, msg.mb, part)


def channel_tag(msg: Message) -> int:
    """The gloo tag of ``msg``'s channel: ``2·stage`` for activations, ``2·stage + 1`` for
    gradients (``stage`` is the sending stage, so every channel has its own tag)."""
    return 2 * msg.stage + (msg.kind == "gradient")


class _Lane:
    """The receives expected on one channel in one step, posted ahead in order."""

    def __init__(self, expected: list[tuple[Message, TensorMeta]]) -> None:
        self.expected = expected  # (message, meta) in the order they were received
        self.next = 0  # index in ``expected`` of the next receive to post
        self.posted: deque = deque()  # (key, meta, work, buffer), oldest first

    def restart(self) -> None:
        if self.posted:  # every receive of a step is consumed within it
            raise RuntimeError(f"{len(self.posted)} posted receive(s) left over from the last step")
        self.next = 0


@dataclass
class P2P:
    """Backend-neutral sends and receives for one rank, with counters and optional trace.

    Args:
        device: where received tensors end up. staged: copy through host memory.
        offset: global rank of this replica's pipeline rank 0 (``Message`` ranks are local).
        channel_groups: ``Message.channel`` -> a two-rank process group for each channel this
            rank uses (NCCL); ``None``: the default group, one tag per channel (gloo).
        lookahead: receives posted ahead per channel from the second step on (gloo only;
            NCCL runs a communicator's operations in posting order, so an early receive
            would block the sends behind it). 0: post each receive when it is needed.
    """

    device: torch.device
    staged: bool = False
    offset: int = 0  # global rank of this replica's pipeline rank 0
    channel_groups: dict | None = None
    trace: bool = field(
        default_factory=lambda: os.environ.get("MINIPIPE_TRACE", "") not in ("", "0"))
    lookahead: int = field(default_factory=lambda: int(os.environ.get("MINIPIPE_LOOKAHEAD", "2")))
    messages_sent: int = 0
    bytes_sent: int = 0
    handshakes_sent: int = 0  # signatures sent: once per edge, again when batch shapes change
    _step: int = 0
    _pending: list = field(default_factory=list)
    _record: list | None = field(default_factory=list)  # first step: (message, meta) received
    _lanes: dict[tuple[str, int], _Lane] = field(default_factory=dict)

    # -- steps ------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """The optimizer step being run; setting it starts that step (see :meth:`start`)."""
        return self._step

    @step.setter
    def step(self, k: int) -> None:
        self.start(k)

    def start(self, k: int, reshape: bool = False) -> None:
        """Begin step ``k``: from the second step on, post the first receives ahead.

        ``reshape``: this step's boundary shapes may differ (handshakes come first), so
        nothing is posted ahead; its receives are recorded for the steps after it.
        """
        self._step = k
        if self.lookahead <= 0:
            return
        if reshape and k > 0:
            for lane in self._lanes.values():
                lane.restart()  # raises if a receive was left over
            self._lanes, self._record = {}, []
            return
        if self._record:  # the step that was recorded is over: arm the lanes with it
            if self.channel_groups is None and dist.is_initialized() \
                    and dist.get_backend() == "gloo":
                by_channel: dict[tuple[str, int], list] = {}
                for (msg, part), meta in self._record:
                    by_channel.setdefault(msg.channel, []).append(((msg, part), meta))
                self._lanes = {ch: _Lane(exp) for ch, exp in by_channel.items()}
            self._record = None
        elif self._record is not None:
            return  # nothing received yet (a first step without receives, or p == 1)
        for lane in self._lanes.values():
            lane.restart()
            self._fill(lane)

    def _fill(self, lane: _Lane) -> None:
        while len(lane.posted) < self.lookahead and lane.next < len(lane.expected):
            (msg, part), meta = lane.expected[lane.next]
            buf = torch.empty(meta.shape, dtype=meta.dtype, device=self._where())
            lane.posted.append((_key(msg, part), meta, self._irecv(buf, msg), buf))
            lane.next += 1

    def _isend(self, tensor: torch.Tensor, msg: Message) -> Any:
        """Post a send on ``msg``'s channel: its tag (gloo) or its own group (NCCL)."""
        dst = self.offset + msg.dst
        if self.channel_groups is not None:
            return dist.isend(tensor, dst, group=self.channel_groups[msg.channel])
        return dist.isend(tensor, dst, tag=channel_tag(msg))

    def _irecv(self, tensor: torch.Tensor, msg: Message) -> Any:
        """Post a receive on ``msg``'s channel."""
        src = self.offset + msg.src
        if self.channel_groups is not None:
            return dist.irecv(tensor, src, group=self.channel_groups[msg.channel])
        return dist.irecv(tensor, src, tag=channel_tag(msg))

    # -- messages -----------------------------------------------------------------------------
    def _log(self, verb: str, msg: Message, t: torch.Tensor) -> None:
        if self.trace:
            peer = msg.dst if verb == "send" else msg.src
            arrow = f"→ {peer}" if verb == "send" else f"← {peer}"
            print(f"rank {msg.dst if verb == 'recv' else msg.src} | step {self.step} | {verb} "
                  f"{msg.kind} mb {msg.mb} (stage {msg.stage}) {arrow} {list(t.shape)} "
                  f"{str(t.dtype)[6:]}", flush=True)

    def send(self, msg: Message, tensor: torch.Tensor) -> None:
        """Post ``tensor`` to ``msg.dst`` without waiting."""
        out = tensor.detach()
        out = out.cpu() if self.staged else out.contiguous()
        self._log("send", msg, out)
        self._pending.append((self._isend(out, msg), out))
        self.messages_sent += 1
        self.bytes_sent += out.numel() * out.element_size()

    def send_signature(self, msg: Message, sig: Signature) -> None:
        """The handshake: post the structure, dtypes and shapes of what follows on an edge
        (before its first message, and in a step whose batch shapes changed)."""
        raw = sig.encode()
        if len(raw) > _SIG_BYTES:
            raise RuntimeError(f"stage {msg.stage} returns a structure too large to describe in "
                               f"{_SIG_BYTES} bytes ({len(raw)}): {sig.tree}")
        buf = torch.zeros(_SIG_BYTES, dtype=torch.uint8)
        buf[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        self._pending.append((self._isend(self._out(buf), msg), buf))
        self.handshakes_sent += 1

    def recv_signature(self, msg: Message) -> Signature:
        """Receive what :meth:`send_signature` posted."""
        buf = torch.empty(_SIG_BYTES, dtype=torch.uint8, device=self._where())
        self._irecv(buf, msg).wait()
        raw = bytes(buf.cpu().tolist())
        return Signature.decode(raw.rstrip(b"\0"))

    def _where(self) -> torch.device:
        return torch.device("cpu") if self.staged else self.device

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self._where())

    def recv(self, msg: Message, meta: TensorMeta, part: int = 0) -> torch.Tensor:
        """Receive tensor ``part`` of the message ``msg`` (blocks until it arrives)."""
        lane = self._lanes.get(msg.channel)
        if lane is not None:
            if not lane.posted:  # lookahead used up (cannot happen with lookahead >= 1)
                self._fill(lane)
            key, want, work, buf = lane.posted.popleft()
            if key != _key(msg, part) or want != meta:
                raise RuntimeError(
                    f"receive posted ahead for {key} {want} but the step asks for {_key(msg, part)} "
                    f"{meta}: every step must receive the same messages in the same order")
            self._fill(lane)  # post the next ones before blocking on this one
        else:
            if self._record is not None and self.lookahead > 0:
                self._record.append(((msg, part), meta))
            buf = torch.empty(meta.shape, dtype=meta.dtype, device=self._where())
            work = self._irecv(buf, msg)
        work.wait()
        self._log("recv", msg, buf)
        return buf.to(self.device) if self.staged else buf

    def flush(self) -> None:
        """Wait for every posted send (end of step)."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()


def channel_groups(channels: list[tuple[tuple[str, int], int, int]], dp: int, p: int,
                   replica: int) -> dict[tuple[str, int], Any]:
    """One two-rank process group per channel (for NCCL), this replica's ones by channel.

    ``channels`` lists every channel of the pipeline as ``(channel, src rank, dst rank)`` in
    one order; every process creates every group in that order, as ``new_group`` requires.
    """
    mine = {}
    for d in range(dp):
        for channel, src, dst in channels:
            group = dist.new_group(sorted((d * p + src, d * p + dst)))
            if d == replica:
                mine[channel] = group
    return mine
