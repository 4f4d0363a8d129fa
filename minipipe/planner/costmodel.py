"""A cost model of a GPT/Llama-style transformer on real hardware: time, memory and messages.

Everything here is arithmetic on a :class:`Model` (layers, hidden size, heads, sequence,
vocabulary) and a :class:`Hardware` (memory, peak FLOP/s and the fraction reached, bandwidths):

- time of one layer per micro-batch: forward ``t_f``, input gradient ``t_b``, weight gradient
  ``t_w`` (the convention of :mod:`minipipe.simulate`), from matrix-product FLOPs;
- activation bytes one layer keeps per micro-batch, without, with selective and with full
  recomputation: the closed forms of Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models", Table 2), tensor parallelism ``t`` and sequence
  parallelism as divisors;
- parameter, gradient and optimizer bytes under mixed-precision Adam (Megatron-LM's 18 bytes
  per parameter; ``6 + 12/dp`` with the optimizer state sharded over data parallelism,
  ``2 + 16/dp`` with the fp32 gradients sharded too); the norms' weights are replicated over
  tensor parallelism, the matrices split (as Megatron-LM's theoretical memory estimate counts);
- the bytes and time of one stage-boundary message;
- the embedding on the first stage and the output layer (and loss) on the last.

Tensor parallelism is a degree in these formulas only: minipipe's runtime does not implement
it. Conventions (the papers' and Megatron-LM's): 2-byte activations and weights, 1-byte dropout
masks, linear-layer biases left out of the parameter count, a causal attention counted as a
full one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Model", "Hardware", "StageCost", "RECOMPUTE", "MODELS", "HARDWARE",
           "layer_flops", "output_flops", "activation_bytes_per_layer", "embedding_activation_bytes",
           "output_activation_bytes", "state_bytes_per_param", "message_bytes", "message_time",
           "tensor_parallel_time", "block_times", "head_times", "stage_costs"]

RECOMPUTE = ("none", "selective", "full")  #: activation recomputation choices
GIB = 2**30  # an "80GB" device has 80 GiB (81920 MiB)


@dataclass(frozen=True)
class Model:
    """A decoder-only transformer.

    Attributes:
        layers, hidden, heads, seq, vocab: ``L``, ``h``, ``a``, ``s``, ``V`` in the papers.
        ffn: MLP inner size (default ``4h``). kv_heads: key/value heads (grouped-query
        attention; default ``heads``). gated: SwiGLU MLP (three matrices, Llama).
        tied: the output layer reuses the embedding (one copy per holding stage).
        flash: attention computed without storing the ``s × s`` scores (FlashAttention): the
        ``5as/h`` term of the activation memory is gone, as with selective recomputation.
        norm: ``"layernorm"`` (weight and bias) or ``"rmsnorm"`` (weight only).
        dropout: the block and the embedding apply dropout (GPT) and keep its 1-byte masks;
        Llama models have none.
    """

    name: str
    layers: int
    hidden: int
    heads: int
    seq: int
    vocab: int
    ffn: int | None = None
    kv_heads: int | None = None
    gated: bool = False
    tied: bool = False
    flash: bool = False
    norm: str = "layernorm"
    dropout: bool = True

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "seq", "vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"Model.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads or self.heads % self.kv:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads}), "
                             f"and heads a multiple of kv_heads ({self.kv})")

    @property
    def f(self) -> int:
        """MLP inner size."""
        return self.ffn or 4 * self.hidden

    @property
    def kv(self) -> int:
        return self.kv_heads or self.heads

    @property
    def norm_params(self) -> int:
        """Parameters of one norm (replicated on every tensor-parallel rank)."""
        return self.hidden * (2 if self.norm == "layernorm" else 1)

    @property
    def layer_params(self) -> int:
        """Parameters of one block (Megatron-LM's count: weights of the four attention and two
        or three MLP matrices, and the two norms; no linear biases)."""
        h, g = self.hidden, self.kv / self.heads
        attention = 2 * h * h * (1 + g)  # Q and output h×h each, K and V h×(h·g) each
        mlp = (3 if self.gated else 2) * h * self.f
        return int(attention + mlp + 2 * self.norm_params)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        """All parameters: blocks, final norm, embedding and (untied) output layer."""
        head = 0 if self.tied else self.embedding_params
        return self.layers * self.layer_params + self.norm_params + self.embedding_params + head


@dataclass(frozen=True)
class Hardware:
    """One kind of accelerator and how they are connected.

    Attributes:
        memory: bytes of device memory. peak_flops: dense 16-bit FLOP/s of one device.
        efficiency: the fraction of peak a large matrix product reaches (a measured number).
        gpus_per_node: devices joined by the fast link. intra_bw / inter_bw: bytes/s one device
        sends over the fast link / the network. latency: seconds per message.
    """

    name: str
    memory: float
    peak_flops: float
    efficiency: float = 0.5
    gpus_per_node: int = 8
    intra_bw: float = 150e9
    inter_bw: float = 25e9
    latency: float = 10e-6

    def flops_time(self, flops: float) -> float:
        return flops / (self.peak_flops * self.efficiency)


@dataclass(frozen=True)
class StageCost:
    """One pipeline stage (a chunk of a rank): its layers, times per micro-batch and bytes."""

    first_layer: int
    layers: int
    embedding: bool
    head: bool
    t_f: float
    t_b: float
    t_w: float
    activation_bytes: float  # kept per micro-batch in flight
    params: float  # parameters held by one tensor-parallel rank (norms whole, matrices / t)
    flops: float = field(default=0.0)  # model FLOPs per micro-batch (forward + backward)
    recompute_flops: float = field(default=0.0)  # FLOPs recomputed per micro-batch


# ------------------------------------------------------------------------------- FLOPs, time


def layer_flops(model: Model, b: int) -> tuple[float, float, float]:
    """FLOPs of one block for a micro-batch of ``b`` sequences: forward, input grad, weight grad.

    Forward: ``2·b·s`` per weight of the matrix products, plus ``4·b·s²·h`` for the attention
    scores and their product with V (Narayanan et al. 2021, eq. 3: ``24bsh² + 4bs²h`` for a
    GPT block). The backward costs twice the forward: the input gradient repeats every product
    once (and the attention's twice, it has no weights); the weight gradient repeats the
    weighted ones.
    """
    s, h = model.seq, model.hidden
    weights = model.layer_params - 2 * model.norm_params
    matmul = 2 * b * s * weights
    attention = 4 * b * s * s * h
    return float(matmul + attention), float(matmul + 2 * attention), float(matmul)


def output_flops(model: Model, b: int) -> tuple[float, float, float]:
    """The output layer (``h × V`` product) on the last stage: forward, input and weight grad."""
    f = 2.0 * b * model.seq * model.hidden * model.vocab
    return f, f, f


def tensor_parallel_time(model: Model, hw: Hardware, b: int, t: int) -> float:
    """Seconds one block spends in tensor-parallel collectives per forward (the same in backward).

    Two all-reduces (or all-gather + reduce-scatter with sequence parallelism, the same volume)
    of the ``b·s·h`` 2-byte activation per block and pass: ``2·2(t−1)/t·bytes / bandwidth``
    over the fast link when ``t`` fits in a node. Not overlapped with compute.
    """
    if t == 1:
        return 0.0
    bw = hw.intra_bw if t <= hw.gpus_per_node else hw.inter_bw
    nbytes = 2 * b * model.seq * model.hidden
    return 2 * (2 * (t - 1) / t * nbytes / bw + hw.latency)


# ---------------------------------------------------------------------------------- memory


def activation_bytes_per_layer(model: Model, b: int, t: int = 1, sp: bool = False,
                               recompute: str = "none") -> float:
    """Bytes one block keeps per micro-batch of ``b`` sequences until its backward.

    Korthikanti et al. 2022, Table 2 (a GPT block, ``ffn = 4h``, ``a`` heads):

    ========================================  =====================================
    no parallelism                             ``sbh(34 + 5as/h)``
    tensor parallel ``t``                      ``sbh(10 + 24/t + 5as/(ht))``
    tensor + sequence parallel                 ``sbh/t·(34 + 5as/h)``
    tensor parallel, selective recompute       ``sbh(10 + 24/t)``
    tensor + sequence, selective recompute     ``sbh·34/t``
    full recomputation                         ``2sbh`` (the block's input only)
    ========================================  =====================================

    The ``10sbh`` outside the tensor-parallel region (two norm inputs, the attention and MLP
    inputs, two dropout masks) is split by sequence parallelism; the ``24sbh`` inside it by
    ``t``. For another MLP size or grouped-query attention the same items are counted:
    Q and the attention output ``2+2``, K and V ``2·kv/a`` each, the MLP's ``4f/h`` (``6f/h``
    gated); ``flash=True`` drops the ``5as/h`` scores like selective recomputation, and a model
    without dropout (``dropout=False``, Llama) keeps ``8sbh`` outside instead of ``10sbh``.
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    s, h, a = model.seq, model.hidden, model.heads
    sbh = s * b * h
    if recompute == "full":
        return 2.0 * sbh
    outside = 10.0 if model.dropout else 8.0  # 2 norm inputs (4), attention and MLP inputs
    # (2 + 2), 2 dropout masks (1 + 1)
    kv = model.kv / a
    inside = 4 + 4 * kv + (6 if model.gated else 4) * model.f / h  # Q, out-proj, K, V, MLP
    scores = 0.0 if recompute == "selective" or model.flash else 5.0 * a * s / h
    return sbh * ((outside / t if sp else outside) + (inside + scores) / t)


def embedding_activation_bytes(model: Model, b: int, t: int = 1, sp: bool = False) -> float:
    """First stage, per micro-batch: the token ids (8 bytes each) and the embedding's dropout
    mask (``sbh``, split by ``t`` under sequence parallelism; none without dropout),
    Korthikanti et al. §4.3."""
    sbh = model.seq * b * model.hidden if model.dropout else 0.0
    return 8.0 * model.seq * b + (sbh / t if sp else sbh)


def output_activation_bytes(model: Model, b: int, t: int = 1) -> float:
    """Last stage, per micro-batch: final norm and output-layer inputs and the fp32 logits for
    the loss, ``4sbh/t·(1 + V/h)`` (Korthikanti et al. §4.3)."""
    sbh = model.seq * b * model.hidden
    return 4.0 * sbh / t * (1 + model.vocab / model.hidden)


def state_bytes_per_param(zero: int = 0, dp: int = 1) -> float:
    """Bytes per parameter for mixed-precision Adam: 2 (16-bit weight) + 4 (fp32 gradient) +
    12 (fp32 master weight, two moments) = 18, as Megatron-LM counts. ``zero=1`` (or True):
    the optimizer state sharded over ``dp`` replicas (Megatron's distributed optimizer, ZeRO
    stage 1), ``6 + 12/dp``; ``zero=2``: the fp32 gradients sharded too (ZeRO stage 2, FSDP
    without resharding the weights after the forward, as Llama 3 405B), ``2 + 16/dp``."""
    if zero not in (0, 1, 2):
        raise ValueError(f"zero must be 0, 1 or 2, got {zero!r}")
    return {0: 18.0, 1: 6.0 + 12.0 / dp, 2: 2.0 + 16.0 / dp}[int(zero)]


# -------------------------------------------------------------------------------- messages


def message_bytes(model: Model, b: int, t: int = 1) -> float:
    """Bytes one rank sends per stage-boundary message (an activation or its gradient):
    ``2·b·s·h / t``, each of the ``t`` tensor-parallel ranks sending its share (sequence
    parallelism, or Megatron-LM's scatter-gather optimisation)."""
    return 2.0 * b * model.seq * model.hidden / t


def message_time(hw: Hardware, nbytes: float, cross_node: bool) -> float:
    """Latency plus bytes over the link the message takes."""
    return hw.latency + nbytes / (hw.inter_bw if cross_node else hw.intra_bw)


# ---------------------------------------------------------------------------------- stages


def block_times(model: Model, hw: Hardware, b: int, t: int = 1,
                recompute: str = "none") -> tuple[float, float, float]:
    """Seconds of one block per micro-batch on one tensor-parallel rank: ``t_f``, ``t_b``, ``t_w``.

    FLOPs over ``t`` at the device's achievable rate, plus the tensor-parallel collectives
    (forward and input gradient). Recomputation adds to ``t_b`` one forward of what it
    recomputes: the whole block for ``full`` (its collectives too), the attention scores for
    ``selective``.
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    f, bi, w = layer_flops(model, b)
    tp = tensor_parallel_time(model, hw, b, t)
    redo = {"none": 0.0, "selective": hw.flops_time(_attention_flops(model, b) / t),
            "full": hw.flops_time(f / t) + tp}[recompute]
    return hw.flops_time(f / t) + tp, hw.flops_time(bi / t) + tp + redo, hw.flops_time(w / t)


def head_times(model: Model, hw: Hardware, b: int, t: int = 1) -> tuple[float, float, float]:
    """Seconds of the output layer per micro-batch on the last stage: ``t_f``, ``t_b``, ``t_w``."""
    return tuple(hw.flops_time(x / t) for x in output_flops(model, b))  # type: ignore[return-value]


def _attention_flops(model: Model, b: int) -> float:
    return 4.0 * b * model.seq ** 2 * model.hidden


def stage_costs(model: Model, hw: Hardware, bounds: list[int], b: int, t: int = 1,
                recompute: str = "none") -> list[StageCost]:
    """Per pipeline stage: times per micro-batch and bytes, for blocks split at ``bounds``.

    ``bounds`` split the ``L`` blocks (stage ``s`` holds blocks ``bounds[s]:bounds[s+1]``);
    the embedding joins stage 0 and the output layer (with the final norm) the last stage.
    Sequence parallelism is on whenever ``t > 1``. Times: :func:`block_times` per block,
    :func:`head_times` on the last stage (the embedding lookup's time is left out).
    """
    sp = t > 1
    block = block_times(model, hw, b, t, recompute)
    head = head_times(model, hw, b, t)
    per_layer = activation_bytes_per_layer(model, b, t, sp, recompute)
    flops = sum(layer_flops(model, b))
    redo = {"none": 0.0, "selective": _attention_flops(model, b),
            "full": layer_flops(model, b)[0]}[recompute]
    out = []
    for s, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        n, first, last = hi - lo, s == 0, s == len(bounds) - 2
        times = [n * x for x in block]
        norms = 2 * model.norm_params  # replicated on every tensor-parallel rank
        params = n * ((model.layer_params - norms) / t + norms)
        acts, work = n * per_layer, n * flops
        if first:
            acts += embedding_activation_bytes(model, b, t, sp)
            params += model.embedding_params / t
        if last:
            times = [x + y for x, y in zip(times, head)]
            acts += output_activation_bytes(model, b, t)
            if not (model.tied and first):
                params += model.embedding_params / t
            params += model.norm_params
            work += sum(output_flops(model, b))
        out.append(StageCost(lo, n, first, last, *times, acts, params, work, n * redo))
    return out


# ------------------------------------------------------------------------------- presets

MODELS = {
    # Llama 2 7B (Touvron et al. 2023, Table 1 and the released config)
    "llama-7b": Model("llama-7b", 32, 4096, 32, 4096, 32000, ffn=11008, gated=True, flash=True,
                      norm="rmsnorm", dropout=False),
    # Llama 3 8B, 70B and 405B (Llama 3 paper, Table 3)
    "llama3-8b": Model("llama3-8b", 32, 4096, 32, 8192, 128256, ffn=14336, kv_heads=8,
                       gated=True, flash=True, norm="rmsnorm", dropout=False),
    "llama3-70b": Model("llama3-70b", 80, 8192, 64, 8192, 128256, ffn=28672, kv_heads=8,
                        gated=True, flash=True, norm="rmsnorm", dropout=False),
    "llama3-405b": Model("llama3-405b", 126, 16384, 128, 8192, 128256, ffn=53248, kv_heads=8,
                         gated=True, flash=True, norm="rmsnorm", dropout=False),
    # GPT-3 175B (Brown et al. 2020) as in Megatron-LM's papers (embedding tied to the output)
    "gpt3-175b": Model("gpt3-175b", 96, 12288, 96, 2048, 51200, tied=True),
}

HARDWARE = {
    # dense BF16 peaks from the vendors' data sheets; NVLink 3/4 per-direction, 200/400 Gb/s NICs
    "a100-80gb": Hardware("a100-80gb", 80 * GIB, 312e12, 0.5, 8, 150e9, 25e9, 10e-6),
    "h100-80gb": Hardware("h100-80gb", 80 * GIB, 989e12, 0.5, 8, 300e9, 50e9, 10e-6),
}
