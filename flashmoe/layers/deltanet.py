"""Gated DeltaNet (linear attention) with its causal conv1d, and the gated delta rule in two forms:
a per-token recurrence for decode and a chunked form for prefill that gives the same result.

Per value head, state S [dk, dv] in fp32; each token: S *= exp(g); delta = (v - S^T k) * beta;
S += k outer delta; o = S^T q.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .. import kernels
from ..kernels.cpu_step import deltanet_layer_step, deltanet_layer_steps, deltanet_layer_weights, deltanet_step
from .state import LinearState
from .fused import Projections, project
from .int8_linear import Bf16Linear
from .norm import GatedRMSNorm, RMSNorm


class GatedDeltaNet(nn.Module):
    def __init__(self, hidden: int, k_heads: int, v_heads: int, k_dim: int, v_dim: int, conv_kernel: int, eps: float,
                 output_gate: str = "silu"):
        super().__init__()
        self.k_heads, self.v_heads, self.k_dim, self.v_dim = k_heads, v_heads, k_dim, v_dim
        self.conv_dim = 2 * k_heads * k_dim + v_heads * v_dim
        self.conv_kernel = conv_kernel
        self.in_proj_qkv = nn.Linear(hidden, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(hidden, v_heads * v_dim, bias=False)
        self.in_proj_b = nn.Linear(hidden, v_heads, bias=False)
        self.in_proj_a = nn.Linear(hidden, v_heads, bias=False)
        self.in_proj = Projections(self, "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, conv_kernel, groups=self.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(v_heads), requires_grad=False)
        self.A_log = nn.Parameter(torch.zeros(v_heads), requires_grad=False)
        self.norm = GatedRMSNorm(v_dim, eps, output_gate)
        self.out_proj = nn.Linear(v_heads * v_dim, hidden, bias=False)
        self._cpu_step_weights: tuple | None = None  # (input norm, decode_cpu_layer's weights)

    def forward(self, x: torch.Tensor, states: list, slices: list[slice], norm: RMSNorm | None = None,
                active: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, hidden]: the tokens of one or more sequences, sequence i's at slices[i], normed
        first by `norm` where given (the layer's input norm); states[i]: its LinearState (conv
        window + recurrent state), updated in place. The projections run on all the tokens at once,
        the conv and the recurrence per sequence. active [sequences] (a decode step's, on the
        device): 0 where a sequence's state must stay as it was (StepContext.active)."""
        if x.shape[0] == len(states) and self.takes_cpu_step(x, norm):  # a token per sequence
            return self.decode_cpu_layer(x, norm, states)
        if norm is not None:
            x = norm(x)
        if x.shape[0] == len(states) and kernels.use_kernels(x) and (fused := fused_states(states)) is not None:
            return self.decode_fused(x, *fused, active)
        if x.shape[0] == 1 and kernels.use_cpu_kernels(x):
            return self.decode_cpu(x, states[0])
        T = x.shape[0]
        qkv, z, b, a = self.in_proj(x)
        if T == len(states):  # a decode step, of one sequence or a batch's: one recurrence step over [B, ...]
            out = self._steps(qkv, b, a, states, active)
        else:
            out = self._recurrences(qkv, b, a, slices, states)
        return project(self.out_proj, self.norm(out.to(x.dtype), z.view(T, self.v_heads, self.v_dim)).reshape(T, -1))

    def _recurrences(self, qkv: torch.Tensor, b: torch.Tensor, a: torch.Tensor, slices: list[slice], states: list
                     ) -> torch.Tensor:
        """The prompts of one or several sequences (a prefill, packed where several): each one's conv
        from its own window, then the gated delta rule of all of them in one pass, their heads side
        by side, each sequence padded at its end with tokens that neither decay nor update a state
        (g = 0, beta = 0, as delta_rule_chunked pads its last chunk) -> [T, v_heads, v_dim] (fp32).
        One pass instead of one per sequence: the rule's calls do not grow with the number of
        sequences. The states are written in place (a captured CUDA graph keeps pointing at them)."""
        conv = torch.cat([causal_conv(qkv[s], state, self.conv1d.weight) for s, state in zip(slices, states)])
        B, H = len(states), self.v_heads
        # [B, L, H, ...] zero-padded, then the heads first: [B * H, L, ...]
        q, k, v, g, beta = (pad_sequence([t[s] for s in slices], batch_first=True).transpose(1, 2).flatten(0, 1)
                            for t in self._heads(conv, b, a))
        rule = delta_rule_recurrent if q.shape[1] == 1 else delta_rule_chunked
        out, new = rule(q, k, v, g, beta, torch.stack([s.recurrent for s in states]).flatten(0, 1))
        for state, rows in zip(states, new.unflatten(0, (B, H))):
            state.recurrent.copy_(rows)
        out = out.unflatten(0, (B, H)).transpose(1, 2)  # [B, L, H, dv]
        return torch.cat([out[i, : s.stop - s.start] for i, s in enumerate(slices)])

    def _steps(self, qkv: torch.Tensor, b: torch.Tensor, a: torch.Tensor, states: list,
               active: torch.Tensor | None = None) -> torch.Tensor:
        """One token of each of B sequences: their conv windows and recurrent states stacked, one
        step of both for all -> [B, v_heads, v_dim] (fp32); each state written back in place, but
        where `active` is 0. The conv's one output is a multiply-and-sum (F.conv1d's CPU path took
        180 us here; entry 73)."""
        windows = torch.stack([torch.cat([s.conv.to(qkv.dtype), qkv[i : i + 1]]) for i, s in enumerate(states)])  # [B, K, C]
        conv = F.silu((windows * self.conv1d.weight[:, 0, :].t()).sum(1))  # the depthwise conv's one output each
        q, k, v, g, beta = self._heads(conv, b, a)
        shifted = windows[:, 1:]
        if active is not None:  # an idle slot's step: no decay (g = 0) and no update (beta = 0), the same window
            keep = active[:, None].to(g.dtype)
            g, beta = g * keep, beta * keep
            shifted = torch.where(active[:, None, None] > 0, shifted, windows[:, :-1])
        q, k, v, g, beta = (t.unsqueeze(2) for t in (q, k, v, g, beta))  # [B, H, 1, ...]
        out, new = delta_rule_recurrent(q, k, v, g, beta, torch.stack([s.recurrent for s in states]))
        for i, s in enumerate(states):
            s.conv.copy_(shifted[i])
            s.recurrent.copy_(new[i])
        return out[:, :, 0]

    def _heads(self, qkv: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Convolved qkv [T, C] and b, a [T, v_heads] -> q, k [T, H, dk], v [T, H, dv], g, beta [T, H]
        (fp32; key heads repeated for the value heads that read them, q scaled)."""
        T = qkv.shape[0]
        kd = self.k_heads * self.k_dim
        q, k, v = qkv.split([kd, kd, self.v_heads * self.v_dim], dim=-1)
        rep = self.v_heads // self.k_heads  # value head j reads key head j // rep
        q = l2norm(q.reshape(T, self.k_heads, self.k_dim).float()).repeat_interleave(rep, dim=1) * self.k_dim**-0.5
        k = l2norm(k.reshape(T, self.k_heads, self.k_dim).float()).repeat_interleave(rep, dim=1)
        v = v.reshape(T, self.v_heads, self.v_dim).float()
        beta = torch.sigmoid(b).float()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        return q, k, v, g, beta

    def new_state(self, dtype: torch.dtype, device) -> LinearState:
        return LinearState(self.conv_kernel, self.conv_dim, self.v_heads, self.k_dim, self.v_dim, dtype, device)

    def decode_fused(self, x: torch.Tensor, conv: torch.Tensor, recurrent: torch.Tensor,
                     active: torch.Tensor | None = None) -> torch.Tensor:
        """A token of each of B sequences with the Triton kernels: the same function as the eager
        path, in two launches instead of a few dozen. x [B, hidden]; conv, recurrent: their windows
        and states (`fused_states`), updated in place but where `active` is 0."""
        from ..kernels.deltanet_step import conv_step, delta_step

        qkv, z, b, a = self.in_proj(x)
        qkv = conv_step(qkv, conv, self.conv1d.weight, active)
        out = delta_step(qkv, z, b, a, self.A_log, self.dt_bias, self.norm.weight, recurrent, self.k_heads,
                         self.norm.eps, self.norm.gate == "sigmoid", active)
        return self.out_proj(out)

    def takes_cpu_step(self, x: torch.Tensor, norm: RMSNorm | None) -> bool:
        """Whether decode tokens (one per sequence) go through `decode_cpu_layer`: fp32 on the CPU
        (numba installed), an input norm to take in, the projections stored as bf16 and fused into
        one (the engine's CPU path)."""
        return (norm is not None and norm.group is None and kernels.use_cpu_kernels(x)
                and self.in_proj.one_matrix(Bf16Linear) is not None and type(self.out_proj) is Bf16Linear)

    def decode_cpu_layer(self, x: torch.Tensor, norm: RMSNorm, states: list) -> torch.Tensor:
        """One token of each sequence: the input norm, the projections and `decode_cpu`'s step,
        in one numba call for one sequence (kernels/cpu_step.deltanet_layer_step), in 2 + B for a
        batch of B (deltanet_layer_steps)."""
        if len(states) == 1:
            return deltanet_layer_step(x, states[0].conv, states[0].recurrent, self.cpu_step_weights(norm))
        return deltanet_layer_steps(x, [(s.conv, s.recurrent) for s in states], self.cpu_step_weights(norm))

    def cpu_step_weights(self, norm: RMSNorm) -> tuple:
        """The weights of `decode_cpu_layer`'s kernel as it reads them (kernels/cpu_step.
        deltanet_layer_weights), made at the first decode step: once loaded and fused, they are
        not replaced."""
        if self._cpu_step_weights is None or self._cpu_step_weights[0] is not norm:
            self._cpu_step_weights = norm, deltanet_layer_weights(
                norm.weight, norm.eps, norm.zero_centred, self.in_proj.one_matrix(Bf16Linear).weight, self.conv1d.weight,
                self.A_log, self.dt_bias, self.norm.weight, self.norm.eps, self.k_heads, self.norm.gate == "sigmoid",
                self.out_proj.weight)
        return self._cpu_step_weights[1]

    def decode_cpu(self, x: torch.Tensor, state) -> torch.Tensor:
        """The same step on the CPU (fp32), the conv, the rule and the norm in one numba call; the
        projections apart (weights of any kind: int8 with --dense-bits 8, fp32 files)."""
        qkv, z, b, a = (y[0] for y in self.in_proj(x))
        out = deltanet_step(qkv, z, b, a, state.conv, self.conv1d.weight, self.A_log, self.dt_bias, self.norm.weight,
                            state.recurrent, self.k_heads, self.norm.eps, self.norm.gate == "sigmoid")
        return project(self.out_proj, out[None])


def fused_states(states: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The conv windows and recurrent states of `states` as the fused step reads them: one state's
    own, or several that are rows 0 .. B-1 of one StatePool stack (a bucket's slots, in order);
    None for several states apart (the eager step stacks them)."""
    if len(states) == 1:
        return states[0].conv, states[0].recurrent
    stack = states[0].stack
    if stack is None or any(s.stack is not stack or s.row != i for i, s in enumerate(states)):
        return None
    return stack[0][: len(states)], stack[1][: len(states)]


def causal_conv(x: torch.Tensor, state, weight: torch.Tensor, dilation: int = 1) -> torch.Tensor:
    """Depthwise causal conv over time of x [T, C] (weight [C, 1, K]), continuing from the last
    (K-1) * dilation inputs kept in state.conv (updated in place); then SiLU."""
    window = torch.cat([state.conv.to(x.dtype), x], dim=0)  # [(K-1)*dilation + T, C]
    state.conv.copy_(window[-state.conv.shape[0] :])
    out = F.conv1d(window.t().unsqueeze(0), weight, groups=weight.shape[0], dilation=dilation)  # [1, C, T]
    return F.silu(out[0].t())


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def delta_rule_recurrent(q, k, v, g, beta, state):
    """One token at a time. q, k [..., H, T, dk]; v [..., H, T, dv]; g, beta [..., H, T]; state
    [..., H, dk, dv] -> (o [..., H, T, dv], state); leading dims: sequences stepped side by side."""
    out = torch.empty_like(v)
    for t in range(q.shape[-2]):
        state = state * g[..., t].exp()[..., None, None]
        kv = torch.einsum("...kv,...k->...v", state, k[..., t, :])
        delta = (v[..., t, :] - kv) * beta[..., t, None]
        state = state + k[..., t, :, None] * delta[..., None, :]
        out[..., t, :] = torch.einsum("...kv,...k->...v", state, q[..., t, :])
    return out, state


def delta_rule_chunked(q, k, v, g, beta, state, chunk: int = 64):
    """The same recurrence, `chunk` tokens at a time.

    Inside a chunk with cumulative log-decay c_t and start state S0, the per-token updates u_t obey
    u_t = beta_t (v_t - e^{c_t} S0^T k_t - sum_{r<t} e^{c_t - c_r} (k_t . k_r) u_r), a unit lower
    triangular system solved in one call; then o_t = e^{c_t} S0^T q_t + sum_{s<=t} e^{c_t - c_s}
    (q_t . k_s) u_s and the end state is e^{c_C} S0 + sum_s e^{c_C - c_s} k_s u_s^T.
    """
    H, T, dk = k.shape
    chunk = min(chunk, max(16, 1 << (T - 1).bit_length()))  # a short prompt pads to 16-32 tokens, not 64
    pad = -T % chunk  # padded tokens have beta = 0 and g = 0: no update, no decay
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    n = (T + pad) // chunk
    q, k, v = (t.reshape(H, n, chunk, -1) for t in (q, k, v))
    c = g.reshape(H, n, chunk).cumsum(-1)
    beta = beta.reshape(H, n, chunk, 1)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = (c[..., :, None] - c[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [H, n, C, C]
    eye = torch.eye(chunk, device=q.device)
    system = eye + (beta * k @ k.transpose(-1, -2) * decay).tril(-1)
    u_v = torch.linalg.solve_triangular(system, beta * v, upper=False, unitriangular=True)
    u_s = torch.linalg.solve_triangular(system, beta * k * c[..., None].exp(), upper=False, unitriangular=True)
    scores = q @ k.transpose(-1, -2) * decay
    q_decayed = q * c[..., None].exp()
    k_to_end = k * (c[..., -1:] - c)[..., None].exp()
    out = torch.empty_like(v)
    for i in range(n):
        u = u_v[:, i] - u_s[:, i] @ state  # [H, C, dv]
        out[:, i] = q_decayed[:, i] @ state + scores[:, i] @ u
        state = state * c[:, i, -1, None, None].exp() + k_to_end[:, i].transpose(-1, -2) @ u
    return out.reshape(H, n * chunk, -1)[:, :T], state
