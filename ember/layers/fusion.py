"""The decode fusions: one post-load transform that swaps fused modules into a
loaded model where their preconditions hold (:func:`apply_decode_fusions`).

Model code states the math (``h = h + attn(norm(h))``, ``down(silu_and_mul(
gate_up(x)))``); at decode row counts (at most 16 rows) on CUDA, the
transform makes the same model run the skinny Triton GEMMs of
:mod:`ember.kernels.triton_gemm`:

- every unquantized linear layer and the LM head get a :class:`SkinnyLinearMethod`
  (the skinny GEMM at <= 16 rows, their plain method otherwise; the LM head
  writes its float32 logits from the GEMM);
- every :class:`~ember.layers.mlp.GatedMLP` computes ``silu(gate) * up`` in
  the gate_up GEMM's epilogue (a quantized one where its method offers
  ``fused_gated_mlp``, e.g. FP8's decode GEMV);
- with ``fold_norm``, each pre-norm decoder layer whose attention is a
  :class:`~ember.layers.attention.QKVAttention` and/or whose MLP is a
  :class:`~ember.layers.mlp.GatedMLP` runs those blocks fused: the block's
  RMSNorm folded into its first GEMM (qkv, gate_up with SiLU-and-mul) and
  the residual add into the epilogue of its last (o_proj, down), so the
  residual stream leaves the block as one tensor;
- with ``fold_norm_weights``, the input RMSNorm's weight is multiplied into
  the qkv weight at load, and the down GEMM of one layer hands the rows' sums
  of squares of the stream to the next layer's qkv GEMM, whose K loop is
  then the plain GEMM's;
- with ``pdl``, the skinny GEMMs launch with programmatic dependent launch on
  Hopper (:mod:`ember.kernels.pdl`).

Steps of more than 16 rows keep cuBLAS and the norm kernels (the fused layers
then add the residual in the cuBLAS GEMM, ``addmm``). Preconditions (else the
model is left as it is): a CUDA device, tensor-parallel size 1, one pipeline stage, and per layer
the plain :class:`~ember.layers.linear.UnquantizedLinearMethod` and an
:class:`~ember.layers.layernorm.RMSNorm`; each kernel call also checks its
own conditions (row count, dtypes, strides, see
:func:`~ember.kernels.triton_gemm.use_skinny_linear`) and else runs the
unfused form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ember.config import KernelConfig
from ember.distributed.parallel_state import get_pp_group, get_tp_size
from ember.layers.activation import silu_and_mul
from ember.layers.attention import ForwardContext, QKVAttention
from ember.layers.layernorm import RMSNorm
from ember.layers.linear import LinearBase, UnquantizedLinearMethod
from ember.layers.mlp import GatedMLP
from ember.layers.quantization.base import LinearMethodBase
from ember.layers.vocab_embedding import ParallelLMHead
from ember.logger import init_logger

logger = init_logger(__name__)


@dataclass(slots=True)
class DecodeFusions:
    """What :func:`apply_decode_fusions` swapped in (all zero: the model is untouched).

    Attributes:
        skinny_linears: linear layers (and LM heads) given a :class:`SkinnyLinearMethod`.
        gated_mlps: gated MLPs computing SiLU-and-mul in the gate_up GEMM.
        fused_attention_blocks, fused_mlp_blocks: decoder-layer blocks run
            with the norm folded into the first GEMM and the residual add
            into the last.
        folded_norm_weights: input norms whose weight was multiplied into qkv.
        sumsq_handoffs: layers whose down GEMM hands the sums of squares to
            the next layer's qkv GEMM.
        pdl: whether the skinny GEMMs launch with PDL.
    """

    skinny_linears: int = 0
    gated_mlps: int = 0
    fused_attention_blocks: int = 0
    fused_mlp_blocks: int = 0
    folded_norm_weights: int = 0
    sumsq_handoffs: int = 0
    pdl: bool = False

    @property
    def applied(self) -> bool:
        return self.skinny_linears > 0


# --------------------------------------------------------------- kernel calls
def _skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, use_pdl: bool,
                   out_dtype: torch.dtype | None = None, residual: torch.Tensor | None = None,
                   with_sumsq: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """``x @ weight.T + bias`` (``.to(out_dtype)``, or ``+ residual``): the
    skinny GEMM where :func:`~ember.kernels.triton_gemm.use_skinny_linear`
    holds (and the residual has x's dtype and unit stride), writing
    ``out_dtype`` or adding the residual in its epilogue; else cuBLAS (the
    residual added in the GEMM, ``addmm``, on CUDA without a bias). With
    ``with_sumsq``, ``(y, sumsq)``: the skinny GEMM's partial sums of squares
    of y's rows ([P, 16] float32), None on the other paths."""
    from ember.kernels.triton_gemm import skinny_linear, use_skinny_linear

    if use_skinny_linear(x, weight) and (residual is None or (residual.dtype == x.dtype
                                                              and residual.stride(1) == 1)):
        return skinny_linear(x, weight, bias, out_dtype, residual, with_sumsq, use_pdl=use_pdl)
    if residual is not None:
        if x.is_cuda and bias is None:
            y = torch.addmm(residual, x, weight.t())  # one rounding instead of two
        else:
            y = F.linear(x, weight, bias) + residual
    else:
        y = F.linear(x, weight, bias)
        y = y if out_dtype is None else y.to(out_dtype)
    return (y, None) if with_sumsq else y


def _skinny_silu_and_mul_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                use_pdl: bool) -> torch.Tensor:
    """``silu(g) * u`` of ``[g | u] = x @ weight.T + bias``: one skinny GEMM
    with the activation in its epilogue (bit-identical to the unfused pair)
    where it applies, else cuBLAS and the SiLU-and-mul kernel."""
    from ember.kernels.triton_gemm import skinny_silu_and_mul_linear, use_skinny_linear

    if use_skinny_linear(x, weight):
        return skinny_silu_and_mul_linear(x, weight, bias, use_pdl=use_pdl)
    return silu_and_mul(_skinny_linear(x, weight, bias, use_pdl))


class SkinnyLinearMethod(LinearMethodBase):
    """Wraps a layer's :class:`UnquantizedLinearMethod`: rows of at most 16
    (decode steps) take the skinny Triton GEMM, the others the plain method.

    Args:
        plain: the layer's method before the transform.
        use_pdl: launch the GEMM with PDL (Hopper).
        out_dtype: None, or torch.float32 for the LM head: the results are
            written widened by the GEMM (no separate cast kernel).
    """

    def __init__(self, plain: UnquantizedLinearMethod, use_pdl: bool, out_dtype: torch.dtype | None = None) -> None:
        self.plain, self.use_pdl, self.out_dtype = plain, use_pdl, out_dtype

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype) -> None:
        self.plain.create_weights(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                                  params_dtype)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.plain.process_weights_after_loading(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """As the plain method; the LM head's (``out_dtype`` float32) returns float32."""
        return _skinny_linear(x, layer.weight, bias, self.use_pdl, self.out_dtype)


# ------------------------------------------------------------ pre-norm blocks
@dataclass(eq=False, slots=True)
class _PreNormInput:
    """A pre-norm block's input before its RMSNorm: stands for ``norm(s)``,
    where ``s = x + residual`` (``x`` when ``residual`` is None) is the
    residual stream, so that the block's first GEMM can fold the norm in
    (when the stream is one tensor) or else compute it (:meth:`materialize`,
    the add fused into the norm kernel).

    ``sumsq``: the stream rows' partial sums of squares [P, 16] float32 that
    the GEMM which wrote ``x`` returned, or None. ``norm_weight_folded``: the
    norm's weight is in the consuming projection's weight (the norm's own
    weight is ones). With ``want_out_sumsq`` the block's last GEMM records
    the partial sums of the stream it returns in ``out_sumsq``.
    """

    x: torch.Tensor
    norm: RMSNorm
    residual: torch.Tensor | None = None
    sumsq: torch.Tensor | None = None
    norm_weight_folded: bool = False
    want_out_sumsq: bool = False
    normed: torch.Tensor | None = None
    _stream: torch.Tensor | None = None
    out_sumsq: torch.Tensor | None = None

    def materialize(self) -> torch.Tensor:
        """The normalized input [num_tokens, hidden] (computed once, by the RMSNorm module)."""
        if self.normed is None:
            if self.residual is None:
                self.normed, self._stream = self.norm(self.x), self.x
            else:
                self.normed, self._stream = self.norm(self.x, self.residual)
        return self.normed

    @property
    def stream(self) -> torch.Tensor:
        """The residual stream ``x + residual`` [num_tokens, hidden]."""
        if self.residual is None:
            return self.x
        self.materialize()
        return self._stream


def _prenorm_linear(inp: _PreNormInput, layer: LinearBase, use_pdl: bool, gated: bool = False) -> torch.Tensor:
    """``layer(norm(stream))`` (``gated``: SiLU-and-mul of it). Decode rows of
    a one-tensor stream, where folding pays
    (:func:`~ember.kernels.triton_gemm.use_skinny_rms_norm_linear`), take one
    skinny GEMM with the RMSNorm folded in
    (:func:`~ember.kernels.triton_gemm.skinny_rms_norm_linear`: agrees with
    the unfused pair to the dtype's precision, not bit for bit).

    With the norm's weight in the projection's weight and the stream's sums of
    squares given, any projection folds (the K loop is the plain GEMM's).
    With the norm's weight still to multiply in the loop, the sums of squares
    computed there cost less than reading the given ones, so those are not
    used."""
    from ember.kernels.triton_gemm import skinny_rms_norm_linear, use_skinny_rms_norm_linear

    weight, bias = layer.weight, layer.bias
    if inp.normed is None and inp.residual is None:
        g = None if inp.norm_weight_folded else inp.norm.weight
        sumsq = inp.sumsq if g is None else None
        if use_skinny_rms_norm_linear(inp.x, weight, sumsq is not None) and inp.norm.weight.dtype == inp.x.dtype:
            return skinny_rms_norm_linear(inp.x, weight, g, inp.norm.eps, bias, gated=gated, sumsq=sumsq,
                                          use_pdl=use_pdl)
    x = inp.materialize()
    return _skinny_silu_and_mul_linear(x, weight, bias, use_pdl) if gated else _skinny_linear(x, weight, bias, use_pdl)


def _residual_linear(x: torch.Tensor, layer: LinearBase, block: _PreNormInput, use_pdl: bool) -> torch.Tensor:
    """``layer(x) + block.stream``, the add in the GEMM; with
    ``block.want_out_sumsq`` the GEMM also records the result rows' sums of
    squares in ``block.out_sumsq`` where it can."""
    if block.want_out_sumsq:
        y, block.out_sumsq = _skinny_linear(x, layer.weight, layer.bias, use_pdl, residual=block.stream,
                                            with_sumsq=True)
        return y
    return _skinny_linear(x, layer.weight, layer.bias, use_pdl, residual=block.stream)


class FusedDecoderLayer(nn.Module):
    """A :class:`~ember.models.utils.PreNormDecoderLayer` whose attention
    block (``fuse_attn``: a :class:`QKVAttention`) and/or MLP block
    (``fuse_mlp``: a :class:`GatedMLP`) run fused (see the module docstring).
    Same submodules and parameter names as the layer it replaces; same
    ``(positions, hidden, residual, ctx) -> (hidden, residual)`` contract: a
    fused block returns the whole stream (residual None), an unfused one the
    block's output and the stream, as the plain layer.

    Args:
        layer: the plain decoder layer.
        fuse_attn, fuse_mlp: which blocks run fused.
        use_pdl: launch the skinny GEMMs with PDL.
    """

    def __init__(self, layer: nn.Module, fuse_attn: bool, fuse_mlp: bool, use_pdl: bool) -> None:
        super().__init__()
        self.self_attn, self.mlp = layer.self_attn, layer.mlp
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        self.fuse_attn, self.fuse_mlp, self.use_pdl = fuse_attn, fuse_mlp, use_pdl
        # Set by apply_decode_fusions: the input norm's weight is in qkv's, and
        # the down GEMM hands the stream's sums of squares to the next layer.
        self.norm_weight_in_qkv = False
        self.sumsq_to_next = False

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn = (lambda inp: self._attn_block(inp, ctx)) if self.fuse_attn else None
        hidden_states, residual = self._block(
            self.input_layernorm, hidden_states, residual, ctx, attn, lambda x: self.self_attn(positions, x, ctx),
            norm_weight_folded=self.norm_weight_in_qkv, want_out_sumsq=False)
        mlp = self._mlp_block if self.fuse_mlp else None
        return self._block(self.post_attention_layernorm, hidden_states, residual, ctx, mlp, self.mlp,
                           norm_weight_folded=False, want_out_sumsq=self.sumsq_to_next)

    def _block(self, norm: RMSNorm, hidden: torch.Tensor, residual: torch.Tensor | None, ctx: ForwardContext,
               fused: Callable[[_PreNormInput], torch.Tensor] | None, plain: Callable[[torch.Tensor], torch.Tensor],
               norm_weight_folded: bool, want_out_sumsq: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One pre-norm block ``h += f(norm(h))`` on the stream ``hidden + residual``.
        The stream's sums of squares, when the previous block's last GEMM
        returned them for this very tensor (``ctx.stream_sumsq``), go with it."""
        known, ctx.stream_sumsq = ctx.stream_sumsq, None
        sumsq = known[1] if known is not None and known[0] is hidden and residual is None else None
        inp = _PreNormInput(hidden, norm, residual, sumsq, norm_weight_folded, want_out_sumsq)
        if fused is None:
            return plain(inp.materialize()), inp.stream
        out = fused(inp)
        if inp.out_sumsq is not None:
            ctx.stream_sumsq = (out, inp.out_sumsq)
        return out, None

    def _attn_block(self, inp: _PreNormInput, ctx: ForwardContext) -> torch.Tensor:
        attn = self.self_attn
        out = attn.attend(_prenorm_linear(inp, attn.qkv_proj, self.use_pdl), ctx)
        return _residual_linear(out, attn.o_proj, inp, self.use_pdl)

    def _mlp_block(self, inp: _PreNormInput) -> torch.Tensor:
        mlp = self.mlp
        h = _prenorm_linear(inp, mlp.gate_up_proj, self.use_pdl, gated=True)
        return _residual_linear(h, mlp.down_proj, inp, self.use_pdl)


class SkinnyGatedMLP(nn.Module):
    """A :class:`GatedMLP` whose gate_up GEMM computes ``silu(gate) * up`` in
    its epilogue at decode row counts (same submodules and parameter names).

    Args:
        mlp: the plain gated MLP.
        use_pdl: launch the skinny GEMMs with PDL.
    """

    def __init__(self, mlp: GatedMLP, use_pdl: bool) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj, self.use_pdl = mlp.gate_up_proj, mlp.down_proj, use_pdl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden]."""
        g = self.gate_up_proj
        return self.down_proj(_skinny_silu_and_mul_linear(x, g.weight, g.bias, self.use_pdl))


# ----------------------------------------------------------------- transform
def _is_plain(layer: nn.Module) -> bool:
    return isinstance(layer, LinearBase) and isinstance(layer.quant_method, (UnquantizedLinearMethod,
                                                                             SkinnyLinearMethod))


def _fold_norm_weight(norm: RMSNorm, weight: torch.Tensor) -> None:
    """Multiply ``norm``'s weight into the columns of ``weight`` [N, K], the
    one projection that consumes the norm, and make the norm's weight ones:
    ``(norm(x) * g) @ W.T == norm(x) @ (W * g).T``, rounded once in the weight
    instead of in every normalized row. A fold of that norm into the GEMM
    (:func:`~ember.kernels.triton_gemm.skinny_rms_norm_linear` with the sums of
    squares given) then runs the plain GEMM's K loop."""
    weight.mul_(norm.weight.to(weight.dtype))
    norm.weight.fill_(1)


def _replace(model: nn.Module, make: Callable[[nn.Module], nn.Module | None]) -> int:
    """Replace every submodule ``m`` for which ``make(m)`` gives a module by
    that module (parents first, each once); returns how many."""
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            new = make(child)
            if new is not None:
                swaps.append((parent, name, new))
    for parent, name, new in swaps:
        setattr(parent, name, new)
    return len(swaps)


def fusion_supported(device: torch.device, tp_size: int, allow_interpreter: bool = False) -> bool:
    """Whether the decode fusions can run at all: a CUDA device (or, with
    ``allow_interpreter``, a CPU device under Triton's interpreter, for tests)
    and tensor-parallel size 1."""
    if tp_size != 1:
        return False
    if device.type == "cuda":
        return True
    from ember.kernels.triton_gemm import INTERPRETED

    return allow_interpreter and INTERPRETED and device.type == "cpu"


def apply_decode_fusions(model: nn.Module, kernel_config: KernelConfig, device: torch.device,
                         allow_interpreter: bool = False) -> DecodeFusions:
    """Swap the decode fusions into the loaded ``model`` (in place) where
    their preconditions hold (see the module docstring). Call once, after the
    weights are loaded and every quant method's
    ``process_weights_after_loading`` ran, before CUDA graphs are captured.

    Args:
        model: the loaded model (a :class:`~ember.models.utils.CausalLM`).
        kernel_config: which fusions to apply (``skinny_gemm`` gates them all;
            ``fold_norm`` the decoder-layer fusions; ``fold_norm_weights``
            the qkv weight fold and the sums-of-squares hand-off; ``pdl``).
        device: the model's device.
        allow_interpreter: also apply on a CPU device when Triton's
            interpreter is on (``TRITON_INTERPRET=1``; tests only).
    Returns:
        What was swapped in (nothing when a precondition fails).
    """
    from ember.kernels.pdl import pdl_supported
    from ember.models.utils import PreNormDecoderLayer

    report = DecodeFusions()
    if not kernel_config.skinny_gemm or not fusion_supported(device, get_tp_size(), allow_interpreter):
        return report
    if get_pp_group().world_size > 1:  # the fused layers hand state from layer to layer within one stage
        return report
    use_pdl = report.pdl = kernel_config.pdl and pdl_supported(device)

    # Decoder layers first (they look at the linear layers' plain methods).
    if kernel_config.fold_norm:
        def fuse_layer(m: nn.Module) -> nn.Module | None:
            # NOTE: only the plain layer's forward, which this one reproduces.
            if not isinstance(m, PreNormDecoderLayer) or type(m).forward is not PreNormDecoderLayer.forward:
                return None
            if not (type(m.input_layernorm) is RMSNorm and type(m.post_attention_layernorm) is RMSNorm):
                return None
            attn = isinstance(m.self_attn, QKVAttention) and _is_plain(m.self_attn.qkv_proj) \
                and _is_plain(m.self_attn.o_proj)
            mlp = type(m.mlp) is GatedMLP and _is_plain(m.mlp.gate_up_proj) and _is_plain(m.mlp.down_proj)
            return FusedDecoderLayer(m, attn, mlp, use_pdl) if attn or mlp else None

        _replace(model, fuse_layer)
        layers = [m for m in model.modules() if isinstance(m, FusedDecoderLayer)]
        report.fused_attention_blocks = sum(m.fuse_attn for m in layers)
        report.fused_mlp_blocks = sum(m.fuse_mlp for m in layers)
        if kernel_config.fold_norm_weights:
            report.folded_norm_weights = _fold_input_norm_weights(layers)
            report.sumsq_handoffs = _link_sumsq(model)

    def gated(m: nn.Module) -> nn.Module | None:
        ok = type(m) is GatedMLP and _is_plain(m.gate_up_proj) and _is_plain(m.down_proj)
        return SkinnyGatedMLP(m, use_pdl) if ok else None

    report.gated_mlps = _replace(model, gated)

    def gated_quantized(m: nn.Module) -> nn.Module | None:
        # A quantized gate_up's method may fuse SwiGLU into its own decode GEMM
        # (``fused_gated_mlp(mlp) -> module or None``, e.g. FP8's).
        make = getattr(getattr(getattr(m, "gate_up_proj", None), "quant_method", None), "fused_gated_mlp", None)
        return make(m) if type(m) is GatedMLP and make is not None else None

    report.gated_mlps += _replace(model, gated_quantized)

    for m in model.modules():
        # A quantized method with decode kernels of its own launches them with PDL too.
        set_decode_pdl = getattr(getattr(m, "quant_method", None), "set_decode_pdl", None)
        if set_decode_pdl is not None:
            set_decode_pdl(use_pdl)
        if type(getattr(m, "quant_method", None)) is not UnquantizedLinearMethod:
            continue
        if isinstance(m, ParallelLMHead):
            m.quant_method = SkinnyLinearMethod(m.quant_method, use_pdl, out_dtype=torch.float32)
        elif isinstance(m, LinearBase):
            m.quant_method = SkinnyLinearMethod(m.quant_method, use_pdl)
        else:
            continue
        report.skinny_linears += 1
    logger.info(f"decode fusions: {report}")
    return report


def _fold_input_norm_weights(layers: list[FusedDecoderLayer]) -> int:
    """Multiply the input RMSNorm's weight into the qkv weight of every layer
    with a fused attention block and plain 16-bit weights of the norm's dtype.
    Decode steps then fold the norm into the qkv GEMM with the sums of
    squares the previous layer's down GEMM returned, at the cost of the plain
    GEMM (less than the norm kernel and the GEMM together)."""
    folded = 0
    for layer in layers:
        if not layer.fuse_attn:
            continue
        qkv = layer.self_attn.qkv_proj
        if (qkv.weight.dtype in (torch.bfloat16, torch.float16)
                and layer.input_layernorm.weight.dtype == qkv.weight.dtype):
            _fold_norm_weight(layer.input_layernorm, qkv.weight.data)
            layer.norm_weight_in_qkv = True
            folded += 1
    return folded


def _link_sumsq(model: nn.Module) -> int:
    """Let each fused layer's down GEMM return the stream's sums of squares
    where the next layer in the same stack takes them (its qkv weight holds
    its input norm's weight); returns how many layers hand them on."""
    linked = 0
    for stack in model.modules():
        if not isinstance(stack, nn.ModuleList):
            continue
        for layer, nxt in zip(stack[:-1], stack[1:]):
            if (isinstance(layer, FusedDecoderLayer) and layer.fuse_mlp and isinstance(nxt, FusedDecoderLayer)
                    and nxt.norm_weight_in_qkv):
                layer.sumsq_to_next = True
                linked += 1
    return linked
