"""The MEFT and parallel adapters of a `meft-worker export` folder, on a transformers model.

An independent implementation of DESIGN.md section 2 for inference, written to be read rather
than to be fast: selection is a loop over tokens.

MEFT, per adapted decoder layer l, with x_t the input of the layer's MLP (the output of its
post-attention RMSNorm) and q_t the lookup query (x_t itself, or with prefetch_layers = p > 0
and l >= p the MLP input of layer l - p):

  selection (fp32 parameters, as the parameter server does):
    g_t   = G q_t                                   gate scores, no softmax
    P_t   = the n_probe experts with the largest g_t (ties: lower expert id)
    s_ti  = g_t[e(i)] * (k_i . q_t)  (gated)  or  k_i . q_t  (ungated), for the keys of P_t only
    I_t   = the top_k keys by s_ti (ties: lower row id)
    S     = sorted union of I_t over the real tokens of the forward call; if |S| > max_rows > 0,
            keep the rows chosen by the most tokens (ties: lower row id) and drop the others
            from every I_t
  output (rows K, V, G rounded to row_dtype, as the worker receives them):
    per_token: y_t = sum_{i in I_t} ReLU((k_i . x_t) * (G_e(i) . q_t)) v_i   (gate factor 1 ungated)
    union:     y_t = sum_{i in S} ReLU(k_i . x_t) v_i                      (real tokens only)

parallel: y_t = sum_i ReLU(k_i . x_t) v_i over all r rows (real tokens only).

y_t is added to the MLP's output (before the residual add). It is computed in fp32 and cast to
the model's dtype. Padding tokens (attention_mask 0) take no part in selection and get no
adapter output. In union mode the output of a token depends on the other real tokens of the
same forward call (the whole batch), exactly as in meft's evaluation; in per_token mode it does
not.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from safetensors.torch import load_file

FORMAT = "meft-export"
FORMAT_VERSION = 1


class ExportError(ValueError):
    """A malformed export folder; the message names the file and the field or tensor."""


@dataclass
class AdapterConfig:
    adapter: str  # "meft" | "parallel"
    r: int
    d: int
    layers: List[int]
    step: int = 0
    # meft only
    E: int = 1
    n_probe: int = 1
    top_k: int = 1
    max_rows: int = 0
    mode: str = "per_token"  # per_token | union
    gated: bool = True
    prefetch_layers: int = 0
    row_dtype: str = "fp32"  # bf16 | fp32: precision of the rows in the output


def _field(cfg: dict, path: str, key: str, kind):
    if key not in cfg:
        raise ExportError(f'{path}: missing field "{key}"')
    value = cfg[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise ExportError(f'{path}: field "{key}" has the wrong type: {value!r}')
    return value


def read_config(export_dir: str) -> AdapterConfig:
    path = os.path.join(export_dir, "adapter_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ExportError(f"{path}: missing (write it with meft-worker export)") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ExportError(f"{path}: not a JSON object")
    if cfg.get("format") != FORMAT:
        raise ExportError(f'{path}: field "format" is {cfg.get("format")!r}, expected "{FORMAT}"')
    if _field(cfg, path, "format_version", int) != FORMAT_VERSION:
        raise ExportError(f'{path}: field "format_version" is {cfg["format_version"]}, '
                          f"this package reads {FORMAT_VERSION}")
    if _field(cfg, path, "activation", str) != "relu":
        raise ExportError(f'{path}: field "activation" is {cfg["activation"]!r}, expected "relu"')
    if _field(cfg, path, "dtype", str) != "float32":
        raise ExportError(f'{path}: field "dtype" is {cfg["dtype"]!r}, expected "float32"')
    c = AdapterConfig(
        adapter=_field(cfg, path, "adapter", str),
        r=_field(cfg, path, "r", int),
        d=_field(cfg, path, "d", int),
        layers=_field(cfg, path, "layers", list),
        step=_field(cfg, path, "step", int),
    )
    if not c.layers or not all(isinstance(l, int) and l >= 0 for l in c.layers):
        raise ExportError(f'{path}: field "layers" must be a non-empty list of layer indices')
    if c.r <= 0 or c.d <= 0:
        raise ExportError(f'{path}: fields "r" ({c.r}) and "d" ({c.d}) must be positive')
    if c.adapter == "parallel":
        return c
    if c.adapter != "meft":
        raise ExportError(f'{path}: field "adapter" is {c.adapter!r}, expected "meft" or "parallel"')
    c.E = _field(cfg, path, "E", int)
    c.n_probe = _field(cfg, path, "n_probe", int)
    c.top_k = _field(cfg, path, "top_k", int)
    c.max_rows = _field(cfg, path, "max_rows", int)
    c.mode = _field(cfg, path, "mode", str)
    gating = _field(cfg, path, "gating", str)
    c.prefetch_layers = _field(cfg, path, "prefetch_layers", int)
    c.row_dtype = _field(cfg, path, "row_dtype", str)
    if c.E <= 0 or c.r % c.E != 0:
        raise ExportError(f'{path}: field "E" ({c.E}) must be positive and divide r ({c.r})')
    if c.n_probe <= 0 or c.top_k <= 0 or c.max_rows < 0 or c.prefetch_layers < 0:
        raise ExportError(f'{path}: fields "n_probe", "top_k" must be positive, "max_rows" and '
                          f'"prefetch_layers" >= 0')
    if c.mode not in ("per_token", "union"):
        raise ExportError(f'{path}: field "mode" is {c.mode!r}, expected "per_token" or "union"')
    if gating not in ("gated", "ungated"):
        raise ExportError(f'{path}: field "gating" is {gating!r}, expected "gated" or "ungated"')
    c.gated = gating == "gated"
    if c.row_dtype not in ("bf16", "fp32"):
        raise ExportError(f'{path}: field "row_dtype" is {c.row_dtype!r}, expected "bf16" or "fp32"')
    return c


def read_tensors(export_dir: str, c: AdapterConfig) -> Dict[int, Dict[str, torch.Tensor]]:
    """layer -> {"keys", "values"[, "router"]}, fp32 on the CPU, shapes checked."""
    path = os.path.join(export_dir, "adapter_model.safetensors")
    if not os.path.exists(path):
        raise ExportError(f"{path}: missing (write it with meft-worker export)")
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types
        raise ExportError(f"{path}: not a readable safetensors file ({e})") from None
    blocks = {"keys": (c.r, c.d), "values": (c.r, c.d)}
    if c.adapter == "meft":
        blocks["router"] = (c.E, c.d)
    out = {}
    for l in c.layers:
        out[l] = {}
        for block, shape in blocks.items():
            name = f"layers.{l}.{block}"
            if name not in tensors:
                raise ExportError(f'{path}: tensor "{name}" is missing')
            t = tensors[name]
            if t.dtype != torch.float32 or tuple(t.shape) != shape:
                raise ExportError(f'{path}: tensor "{name}" is {t.dtype} {tuple(t.shape)}, '
                                  f"expected torch.float32 {shape}")
            out[l][block] = t
    return out


def _round_rows(t: torch.Tensor, row_dtype: str) -> torch.Tensor:
    # bf16 rounding to nearest even, as the parameter server encodes rows on the wire.
    return t.to(torch.bfloat16).to(torch.float32) if row_dtype == "bf16" else t


def _better_first(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Order of `scores` from highest to lowest, equal scores by lower id."""
    by_id = torch.argsort(ids, stable=True)
    by_score = torch.argsort(-scores[by_id], stable=True)
    return by_id[by_score]


def select(c: AdapterConfig, params: Dict[str, torch.Tensor], q: torch.Tensor,
           real: torch.Tensor) -> List[List[int]]:
    """I_t for every token of q [N, d] (fp32): row ids in decreasing score; [] for padding."""
    K, G = params["keys"], params["router"]
    nk = c.r // c.E
    n_probe = min(c.n_probe, c.E)
    chosen: List[List[int]] = []
    for t in range(q.shape[0]):
        if not bool(real[t]):
            chosen.append([])
            continue
        g = G @ q[t]
        experts = _better_first(g, torch.arange(c.E))[:n_probe]
        ids = torch.cat([torch.arange(e * nk, (e + 1) * nk) for e in experts.tolist()])
        s = K[ids] @ q[t]
        if c.gated:
            s = g[ids // nk] * s
        chosen.append(ids[_better_first(s, ids)[: c.top_k]].tolist())
    # The max_rows cap on |S|: keep the rows chosen by the most tokens.
    union = sorted({i for rows in chosen for i in rows})
    if 0 < c.max_rows < len(union):
        count = {i: 0 for i in union}
        for rows in chosen:
            for i in rows:
                count[i] += 1
        kept = set(sorted(union, key=lambda i: (-count[i], i))[: c.max_rows])
        chosen = [[i for i in rows if i in kept] for rows in chosen]
    return chosen


def meft_delta(c: AdapterConfig, params: Dict[str, torch.Tensor], x: torch.Tensor,
               q: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The MEFT adapter output for x, q [N, d] (fp32) and real [N] bool."""
    chosen = select(c, params, q, real)

    def rows(block: str, ids: torch.Tensor) -> torch.Tensor:
        return _round_rows(params[block][ids], c.row_dtype)

    nk = c.r // c.E
    if c.mode == "union":
        S = torch.tensor(sorted({i for ids in chosen for i in ids}), dtype=torch.long)
        y = torch.relu(x @ rows("keys", S).T) @ rows("values", S)
        return y * real.unsqueeze(1).to(y.dtype)
    y = torch.zeros_like(x)
    for t, ids in enumerate(chosen):
        if not ids:
            continue
        I = torch.tensor(ids, dtype=torch.long)
        a = rows("keys", I) @ x[t]
        if c.gated:
            a = a * (rows("router", I // nk) @ q[t])
        y[t] = torch.relu(a) @ rows("values", I)
    return y


def parallel_delta(params: Dict[str, torch.Tensor], x: torch.Tensor,
                   real: torch.Tensor) -> torch.Tensor:
    y = torch.relu(x @ params["keys"].T) @ params["values"]
    return y * real.unsqueeze(1).to(y.dtype)


@dataclass
class _ForwardState:
    """What the hooks of one forward call share: the mask of its tokens, every MLP input."""
    real: Optional[torch.Tensor] = None  # [B, T] bool
    inputs: Dict[int, torch.Tensor] = field(default_factory=dict)


class AttachedAdapter:
    """The hooks attach() registered; remove() takes them off the model again."""

    def __init__(self, config: AdapterConfig, params, handles):
        self.config = config
        self.params = params
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def attach(model, export_dir: str) -> AttachedAdapter:
    """Adds the exported adapter to `model` (a transformers LlamaForCausalLM or
    MistralForCausalLM, any dtype and device) through forward hooks on its decoder layers'
    MLPs. Raises ExportError for a malformed folder or one that does not fit the model."""
    c = read_config(export_dir)
    params = read_tensors(export_dir, c)
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__}: expected a *ForCausalLM with .model.layers")
    hidden = model.config.hidden_size
    path = os.path.join(export_dir, "adapter_config.json")
    if hidden != c.d:
        raise ExportError(f'{path}: field "d" is {c.d} but the model\'s hidden_size is {hidden}')
    for l in c.layers:
        if l >= len(layers):
            raise ExportError(f'{path}: field "layers" holds {l} but the model has '
                              f"{len(layers)} layers")
    state = _ForwardState()

    def before_decoder(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        batch, length = (ids.shape if ids is not None else embeds.shape[:2])
        mask = kwargs.get("attention_mask")
        if mask is None:
            state.real = torch.ones(batch, length, dtype=torch.bool)
        elif mask.dim() == 2:
            state.real = mask[:, -length:].to("cpu").ne(0)  # the new tokens' columns
        else:
            raise ValueError("meft_adapter: only a 2-D attention_mask (1 = token) is supported")
        state.inputs = {}

    def after_mlp(layer: int):
        def hook(_module, args, output):
            x = args[0]
            state.inputs[layer] = x
            if layer not in params:
                return None
            shape = x.shape
            xf = x.detach().to("cpu", torch.float32).reshape(-1, c.d)
            real = state.real.reshape(-1)
            if c.adapter == "parallel":
                y = parallel_delta(params[layer], xf, real)
            else:
                p = c.prefetch_layers
                q = state.inputs[layer - p] if p > 0 and layer >= p else x
                qf = q.detach().to("cpu", torch.float32).reshape(-1, c.d)
                y = meft_delta(c, params[layer], xf, qf, real)
            return output + y.reshape(shape).to(device=output.device, dtype=output.dtype)
        return hook

    handles = [decoder.register_forward_pre_hook(before_decoder, with_kwargs=True)]
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.register_forward_hook(after_mlp(i)))
    return AttachedAdapter(c, params, handles)
