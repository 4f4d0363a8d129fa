"""Point-to-point messages between stages, the same on gloo and NCCL.

Sends are posted without waiting and their handles kept until :meth:`P2P.flush`; receives
are waited for before the action that needs them. With ``staged=True`` (gloo with CUDA
compute) tensors go through host memory. ``MINIPIPE_TRACE=1`` prints every message as
``rank 0 | step 1 | send activation mb 0 → 1 [4, 16] float32``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .validate import Message

__all__ = ["P2P", "TensorMeta"]

_HEADER = 10  # dtype code, ndim, up to 8 dims
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
           torch.bool, torch.uint8]


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of a boundary tensor (learned once per stage edge, then reused)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class P2P:
    """Backend-neutral sends and receives for one rank, with counters and optional trace.

    Args:
        device: where received tensors end up. staged: copy through host memory.
        rank_of: maps a pipeline rank (``Message.src``/``dst``) to the global rank.
    """

    device: torch.device
    staged: bool = False
    offset: int = 0  # global rank of this replica's pipeline rank 0
    trace: bool = field(default_factory=lambda: os.environ.get("MINIPIPE_TRACE", "") not in ("", "0"))
    step: int = 0
    messages_sent: int = 0
    bytes_sent: int = 0
    _pending: list = field(default_factory=list)

    def _log(self, verb: str, msg: Message, t: torch.Tensor) -> None:
        if self.trace:
            peer = msg.dst if verb == "send" else msg.src
            arrow = f"→ {peer}" if verb == "send" else f"← {peer}"
            print(f"rank {msg.dst if verb == 'recv' else msg.src} | step {self.step} | {verb} "
                  f"{msg.kind} mb {msg.mb} {arrow} {list(t.shape)} {str(t.dtype)[6:]}", flush=True)

    def send(self, msg: Message, tensor: torch.Tensor) -> None:
        """Post ``tensor`` to ``msg.dst`` without waiting."""
        out = tensor.detach()
        out = out.cpu() if self.staged else out.contiguous()
        self._log("send", msg, out)
        self._pending.append((dist.isend(out, self.offset + msg.dst), out))
        self.messages_sent += 1
        self.bytes_sent += out.numel() * out.element_size()

    def send_meta(self, msg: Message, tensor: torch.Tensor) -> None:
        """Post the shape and dtype of ``tensor`` ahead of the first message on an edge."""
        code = _DTYPES.index(tensor.dtype)
        header = torch.tensor([code, tensor.dim(), *tensor.shape], dtype=torch.int64)
        header = torch.cat([header, header.new_zeros(_HEADER - len(header))])
        self._pending.append((dist.isend(self._out(header), self.offset + msg.dst), header))

    def recv_meta(self, msg: Message) -> TensorMeta:
        """Receive what :meth:`send_meta` posted."""
        header = torch.empty(_HEADER, dtype=torch.int64, device=self._where())
        dist.irecv(header, self.offset + msg.src).wait()
        code, ndim, *dims = header.tolist()
        return TensorMeta(tuple(dims[:ndim]), _DTYPES[code])

    def _where(self) -> torch.device:
        return torch.device("cpu") if self.staged else self.device

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self._where())

    def recv(self, msg: Message, meta: TensorMeta) -> torch.Tensor:
        """Receive the tensor described by ``msg`` (blocks until it arrives)."""
        where = self._where()
        buf = torch.empty(meta.shape, dtype=meta.dtype, device=where)
        dist.irecv(buf, self.offset + msg.src).wait()
        self._log("recv", msg, buf)
        return buf.to(self.device) if self.staged else buf

    def flush(self) -> None:
        """Wait for every posted send (end of step)."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()
