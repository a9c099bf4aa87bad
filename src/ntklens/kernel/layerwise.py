"""The eNTK from structured per-sample gradients and the Gram identity.

A weight W used as ``out = W a`` (at positions l: rows of a linear input, patches of a
convolution) has the per-sample gradient ∂f_a(x_i)/∂W = Σ_l G_{ial} ⊗ A_{il}, with A the
use's input and G the cotangent of its output. Its kernel contribution is therefore

    Θ_W[(i,a),(j,b)] = Σ_{l,m} (A_il · A_jm) (G_ial · G_jbm),

which for one position is (A Aᵀ) ⊙ (G Gᵀ): Grams of small matrices in place of a
contraction over all of W's entries. An embedding is the same with A one-hot: its input
Gram is the equality of tokens. A bias is a weight on a constant input 1. Norm affines
and other elementwise parameters get their per-sample gradients from the same
cotangents. Where positions are many, the per-sample weight gradient Σ_l G ⊗ A is formed
instead and contracted like a Jacobian, whichever costs fewer FLOPs.

:mod:`ntklens.kernel.rules` records the uses (views of a parameter included, as an index
map back to its entries). Uses of one parameter with the same index map concatenate
along positions, which makes the cross terms of shared weights exact; uses on disjoint
entries (q, k and v chunks of a packed projection) add; uses that overlap otherwise are
combined as per-sample gradients on the parameter's own entries. A weight-normalized
weight ``g·v/‖v‖`` contributes through the parametrization's Jacobian. The sample axis
of every use is found by recording the model on two batches of different sizes and
checking that each sample's rows are the same in both (:func:`rules.find_layout`).
Parameters used in any other way get exact per-sample Jacobians restricted to them
(:mod:`ntklens.kernel.jacobian`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ntklens.errors import NtkLensError
from ntklens.kernel.functional import (
    ModelProbe,
    model_output,
    per_sample,
    probe_model,
    trainable_parameters,
)
from ntklens.kernel.jacobian import (
    add_jacobian_product,
    empty_block,
    jacobian_cost,
    per_sample_jacobians,
)
from ntklens.kernel.parametrized import (
    Materialized,
    WeightNormed,
    find_materialized,
    find_weight_norms,
    materialized,
    pull_back,
)
from ntklens.kernel.rules import GRAM_RULES, Layout, Recorder, Use, WeightNorm, find_layout
from ntklens.kernel.tiling import Cost, Footprint, TiledKernel

#: Sample counts of the two probe batches: (s0, s1) and (s1, s0, s2).
_PROBE_A, _PROBE_B = 2, 3


@dataclass(frozen=True)
class _Group:
    """Uses of one tracked tensor whose kernel share is computed together.

    ``kind``: "gram" (linear-like uses, Gram or gradients), "embedding", "elementwise"
    (gradients), "scatter" (overlapping uses, gradients on the parameter's entries).
    ``mode`` "gram" keeps inputs and cotangents and contracts their Grams; "grads" forms
    per-sample gradients. ``bias``: a bias folded in as a constant input 1.
    ``cotangents``: their structure on the probe batch (:func:`_cotangent_structure`),
    which prices the Gram contraction.
    """

    key: str
    uses: tuple[int, ...]
    kind: Literal["gram", "embedding", "elementwise", "scatter"]
    mode: Literal["gram", "grads"]
    n_groups: int
    positions: int
    in_dim: int
    out_dim: int
    n_entries: int
    bias: str | None = None
    bias_square: float = 0.0
    weight_norm: WeightNorm | None = None
    cotangents: Literal["general", "shared", "gated"] = "general"


@dataclass
class GramFeatures:
    """A use's inputs (T, Gr, D, L) or tokens (T, L), and cotangents (T, K, Gr, C, L).

    ``bias``: c² for a bias folded in as an input c at every position (0: none).
    ``shared``: every sample's cotangents are the same (a use followed only by linear
    maps to the outputs), which the contraction exploits.
    ``gated``: try the cotangents as per-sample gates (T, Gr, C, L) times directions
    (K, Gr, C, L) common to the samples (a use followed by an elementwise map, then
    shared cotangents); :meth:`factors` factors them once, on first use.
    """

    inputs: Tensor | None
    tokens: Tensor | None
    cotangents: Tensor
    bias: float
    shared: bool = False
    gated: bool = False
    _factors: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.cotangents)

    def __getitem__(self, rows: slice) -> GramFeatures:
        factors = self.factors()
        return GramFeatures(
            None if self.inputs is None else self.inputs[rows],
            None if self.tokens is None else self.tokens[rows],
            self.cotangents[rows],
            self.bias,
            self.shared,
            factors is not None,
            None if factors is None else (factors[0][rows], factors[1]),
        )

    def factors(self) -> tuple[Tensor, Tensor] | None:
        """(gates, directions) of the gated cotangents, or None where they do not factor
        (or are not gated): computed once, as a tile is contracted with many others."""
        if self.gated and self._factors is None:
            self._factors = _gated_factors(self.cotangents)
            self.gated = self._factors is not None
        return self._factors

    @staticmethod
    def join(parts: list[GramFeatures]) -> GramFeatures:
        """The features of consecutive chunks of samples as one."""

        def cat(tensors: list[Tensor | None]) -> Tensor | None:
            return None if tensors[0] is None else torch.cat(tensors)

        first = parts[0]
        shared = all(p.shared and torch.equal(p.cotangents[0], first.cotangents[0]) for p in parts)
        return GramFeatures(
            cat([p.inputs for p in parts]),
            cat([p.tokens for p in parts]),
            torch.cat([p.cotangents for p in parts]),
            first.bias,
            shared,
            all(p.gated for p in parts),
        )


@dataclass
class WeightedGrads:
    """Per-sample vectors h (T, K, E) contracted as Σ_e w_e h_iae h_jbe.

    Where they come from gated cotangents, h_iae = γ_ie u_ae: ``gates`` (T, E) times
    ``directions`` (K, E) common to the samples, and a traced pair of gated tiles costs E
    in place of K·E; h is then formed only against a tile that is not gated. h·w is
    formed once per tile (on first use), not per block.
    """

    w: Tensor
    dense: Tensor | None = None
    gates: Tensor | None = None
    directions: Tensor | None = None
    _weighted: Tensor | None = field(default=None, repr=False)

    @property
    def h(self) -> Tensor:
        if self.dense is None:
            assert self.gates is not None and self.directions is not None
            self.dense = self.gates[:, None] * self.directions[None]
        return self.dense

    @property
    def weighted(self) -> Tensor:
        if self._weighted is None:
            self._weighted = self.h * self.w
        return self._weighted

    def __len__(self) -> int:
        return len(self.gates if self.gates is not None else self.h)

    def __getitem__(self, rows: slice) -> WeightedGrads:
        if self.gates is not None:
            return WeightedGrads(self.w, gates=self.gates[rows], directions=self.directions)
        return WeightedGrads(self.w, self.h[rows], _weighted=self.weighted[rows])

    @staticmethod
    def join(parts: list[WeightedGrads]) -> WeightedGrads:
        """The vectors of consecutive chunks of samples as one."""
        first = parts[0]
        d = first.directions
        if d is not None and all(
            p.gates is not None and p.directions is not None and torch.equal(p.directions, d)
            for p in parts
        ):
            gates = torch.cat([p.gates for p in parts])  # type: ignore[misc]
            return WeightedGrads(first.w, gates=gates, directions=first.directions)
        return WeightedGrads(first.w, torch.cat([p.h for p in parts]))


def _add_weighted_product(block: Tensor, a: WeightedGrads, b: WeightedGrads) -> None:
    """Add Σ_e w_e h_iae h'_jbe to the block (traced over a = b if 2-D)."""
    if block.dim() == 2 and a.gates is not None and b.gates is not None:
        assert a.directions is not None and b.directions is not None
        mixed = a.w * (a.directions * b.directions).sum(0)  # Σ_a u_ae u'_ae w_e
        block.addmm_(a.gates * mixed, b.gates.T)
    else:
        add_jacobian_product(block, a.weighted, b.h)


@dataclass
class LayerwisePlan:
    """How each trainable parameter's share of the kernel is computed.

    Built from two recorded forward passes on a few samples (:meth:`probe`).
    ``rules``: per parameter, the rule that covers it or why it falls back.
    """

    groups: list[_Group]
    fallback: list[str]
    n_outputs: int
    full: bool
    params: dict[str, Tensor] = field(repr=False)
    signatures: list[tuple] = field(repr=False, default_factory=list)
    layouts: list[Layout | None] = field(repr=False, default_factory=list)
    rules: dict[str, str] = field(repr=False, default_factory=dict)
    #: a parameter is used with autograd off (a custom autograd.Function): no forward AD
    opaque: bool = False
    aranges: dict[str, Tensor] = field(repr=False, default_factory=dict)
    #: parametrized tensors whose uses are recorded on the materialized weight, by key
    materialized: dict[str, Materialized] = field(repr=False, default_factory=dict)
    #: weight-normed tensors, materialized likewise, whose uses the weight-norm rule covers
    weight_norms: dict[str, WeightNormed] = field(repr=False, default_factory=dict)
    #: per scattered use (by index): where each entry comes from, or None if it repeats
    #: entries; batch-independent, so computed once, not per tile
    gathers: dict[int, Tensor | None] = field(repr=False, default_factory=dict)
    #: per weight-normed tensor: (u, c, w) of :meth:`_weight_norm_features`, computed once
    normalized: dict[str, tuple[Tensor, Tensor, Tensor]] = field(repr=False, default_factory=dict)
    #: reused memory that streamed gradients are formed into, by side of a block
    buffers: dict[str, Tensor] = field(repr=False, default_factory=dict)

    @classmethod
    def probe(
        cls,
        model: nn.Module,
        x: Tensor,
        n_pairs: float,
        full: bool,
        x2: Tensor | None = None,
    ) -> tuple[LayerwisePlan, ModelProbe]:
        """Record the model's uses on two small batches and choose a mode per group.

        The batches hold samples (s0, s1) and (s1, s0, s2) of ``x`` (then ``x2``, repeated
        if there are fewer). ``n_pairs`` (sample pairs per sample featurized) weighs
        per-sample work against per-pair work. The same passes measure the model's
        per-sample costs (their difference; FLOPs in a pass of their own each), returned
        with the plan; the second one's cotangents price the Gram groups.
        """
        params = trainable_parameters(model)
        pool = x[:3] if x2 is None or len(x) >= 3 else torch.cat([x[:3], x2[: 3 - len(x)]])
        samples = pool[[0 % len(pool), 1 % len(pool), 2 % len(pool)]]
        batch_a, batch_b = samples[[0, 1]], samples[[1, 0, 2]]
        aranges: dict[str, Tensor] = {}
        entries, norms = find_materialized(model, params), find_weight_norms(model, params)
        derived = {key: w.norm for key, w in norms.items()}
        outputs: list[Tensor] = []
        with materialized(entries, norms) as weights:  # once for the four passes
            rec_a = Recorder(params | weights, aranges, derived)
            rec_b = Recorder(params | weights, aranges, derived)
            probe_a = probe_model(model, batch_a, _PROBE_A, rec_a)
            probe_b = probe_model(model, batch_b, _PROBE_B, rec_b, outputs)
        out_b = outputs[0].reshape(_PROBE_B, -1)
        probe = per_sample(probe_a, probe_b, _PROBE_A, _PROBE_B)
        _detach_shared_chains(rec_a.uses, rec_b.uses, out_b)
        plan = cls._from_recordings(rec_a, rec_b, params, probe, n_pairs, full, entries)
        plan.aranges = aranges
        used = {g.key for g in plan.groups}
        plan.weight_norms = {key: w for key, w in norms.items() if key in used}
        plan._price_cotangents(rec_b.uses, out_b, n_pairs)
        return plan, probe

    def _price_cotangents(self, uses: list[Use], out: Tensor, n_pairs: float) -> None:
        """Find each Gram group's cotangent structure on the probe batch (its recorded
        ``uses`` and output ``out``) and choose its mode again with the contraction that
        structure allows. Only a guide to the cost: every tile checks its own cotangents
        before a structured contraction."""
        priced = [
            i
            for i, g in enumerate(self.groups)
            if g.kind == "gram" and g.key not in self.materialized
        ]
        if not priced:
            return
        cotangents = self._cotangents(uses, out)
        for i in priced:
            group = self.groups[i]
            parts = [
                _gram_parts(uses[u], self.layouts[u], cotangents[id(uses[u].output)], len(out))[1]
                for u in group.uses
            ]
            gating = not self.full and _gating_pays(group, self.n_outputs, n_pairs)
            structure = _cotangent_structure(torch.cat(parts, dim=-1), gating)
            if structure == group.cotangents:
                continue
            group = replace(group, cotangents=structure)
            if group.weight_norm is None:  # a weight-norm group has its Gram rule alone
                group = _cheaper_mode(group, self.n_outputs, n_pairs, self.full)
            self.groups[i] = group
            same_key = [g for g in self.groups if g.key == group.key]
            rule = " + ".join(_describe(g, uses) for g in same_key)
            wn = group.weight_norm
            for name in [wn.v, wn.g] if wn is not None else [group.key]:
                self.rules[name] = rule
            if group.bias is not None:
                self.rules[group.bias] = _describe_bias(group)

    @classmethod
    def _from_recordings(
        cls,
        rec_a: Recorder,
        rec_b: Recorder,
        params: dict[str, Tensor],
        probe: ModelProbe,
        n_pairs: float,
        full: bool,
        entries: dict[str, Materialized],
    ) -> LayerwisePlan:
        k = probe.n_outputs
        why = dict(rec_b.other_uses) | dict(rec_a.other_uses)
        uses = rec_a.uses
        signatures = [u.signature for u in uses]
        if signatures != [u.signature for u in rec_b.uses]:
            for u in uses + rec_b.uses:
                why.setdefault(u.key, "its calls differ between batches of 2 and 3 samples")
        layouts: list[Layout | None] = []
        for i, use in enumerate(uses):
            layout = None
            if use.key not in why:
                layout = find_layout(use, rec_b.uses[i], _PROBE_A, _PROBE_B)
                if layout is not None and use.pshape is not None and use.pshape[layout.axis] != 1:
                    layout = None
                if layout is None:
                    shape = tuple(use.source.shape)
                    why[use.key] = f"{use.rule} input of shape {shape} has no per-sample axis"
            layouts.append(layout)
        for key, derived in rec_a.derived.items():
            if any(u.key in (derived.v, derived.g) for u in uses) or {derived.v, derived.g} & set(
                why
            ):
                why.setdefault(key, "its tensors are also used directly")
        by_key: dict[str, list[int]] = defaultdict(list)
        for i, use in enumerate(uses):
            if use.key not in why:
                by_key[use.key].append(i)
        groups: list[_Group] = []
        rules: dict[str, str] = {}
        for key, indices in by_key.items():
            if key in entries:  # per-sample gradients in W's layout, then W's vjp
                groups.append(_scatter_group(key, indices, uses, layouts))
                continue
            derived = rec_a.derived.get(key)
            arange = rec_a._aranges.get(key)
            made = _key_groups(key, indices, uses, layouts, k, n_pairs, full, derived, arange)
            if made is None:
                why[key] = "its weight-norm uses are not one plain linear or conv class"
                continue
            groups.extend(made)
        _fold_biases(groups, uses, params)
        for g in groups:
            names = [g.weight_norm.v, g.weight_norm.g] if g.weight_norm else [g.key]
            if g.key in entries:
                names = list(entries[g.key].originals)
            for name in names:
                rule = _describe(g, uses, entries.get(g.key))
                rules[name] = rule if name not in rules else f"{rules[name]} + {rule}"
            if g.bias is not None:
                rules[g.bias] = _describe_bias(g)
        fallback = [name for name in params if name not in rules]
        for key, derived in rec_a.derived.items():
            for name in (derived.v, derived.g):
                if name in fallback:
                    why.setdefault(name, why.get(key, "weight norm not structured"))
        for entry in entries.values():
            for name in entry.originals:
                if name in fallback and entry.key in why:
                    why.setdefault(name, f"its parametrized {entry.key}: {why[entry.key]}")
        for name in fallback:
            rules[name] = "fallback: " + why.get(name, "no use seen by the recorder")
        opaque = rec_a.opaque or rec_b.opaque
        plan = cls(groups, fallback, k, full, params, signatures, layouts, rules, opaque)
        plan.materialized = {key: e for key, e in entries.items() if key in by_key}
        return plan

    def cost(self, probe: ModelProbe) -> Cost:
        """Work and memory: capture passes, Gram or gradient features, fallback Jacobians."""
        return self._costs(probe)[0]

    def fallback_share(self, probe: ModelProbe, n_pairs: float) -> float:
        """The fallback Jacobians' share of this plan's estimated work."""
        total, fallback = self._costs(probe)
        if fallback is None:
            return 0.0

        def work(c: Cost) -> float:
            return 3.0 * c.feature_flops + c.matmul_flops + n_pairs * c.pair_flops

        return work(fallback) / max(work(total), 1.0)

    def _costs(self, probe: ModelProbe) -> tuple[Cost, Cost | None]:
        k, size = self.n_outputs, probe.element_size
        # a forward pass and K backward passes that skip weight gradients
        feature_flops = (1 + k) * probe.forward_flops if self.groups else 0.0
        matmul_flops = pair_flops = feature = work = largest_pair = largest_streamed = 0.0
        for g in self.groups:
            f_flops, p_flops, f_elems, p_elems = _group_costs(g, k, self.full)
            captured = _captured_entries(g, k)
            if self._streams(g):  # inputs and cotangents kept, gradients formed in pieces
                f_elems = captured
                largest_streamed = max(largest_streamed, k * _grad_entries(g) * size)
            matmul_flops += f_flops
            pair_flops += p_flops
            feature += f_elems * size
            work += captured * size
            largest_pair = max(largest_pair, p_elems * size)
        if self.groups:
            # the two buffers of streamed pieces hold at most the largest group, two tiles
            work += (2 + k) * probe.activation_bytes + 2 * largest_streamed
        jac = None
        if self.fallback:
            n_fallback = sum(self.params[name].numel() for name in self.fallback)
            jac = jacobian_cost(probe, n_fallback, self.full)
            feature_flops += jac.feature_flops
            pair_flops += jac.pair_flops
            feature += jac.footprint.feature
            work += jac.footprint.work
        k_pair = k * k if self.full else 1
        footprint = Footprint(feature, work, 2 * k_pair * size + largest_pair)
        return Cost(feature_flops, pair_flops, footprint, matmul_flops), jac

    def _streams(self, g: _Group) -> bool:
        """Whether ``g``'s per-sample gradients are :class:`StreamedGrads`: where they
        are larger than the inputs and cotangents they are formed from (a sequence layer's
        K·C·D against L·(D + K·C)); a convolution's im2col patches are often the larger,
        and its gradients are then formed once, at capture."""
        return (
            g.mode == "grads"
            and g.kind in ("gram", "embedding")
            and g.weight_norm is None
            and g.key not in self.materialized
            and self.n_outputs * _grad_entries(g) > _captured_entries(g, self.n_outputs)
        )

    def kernel(self, model: nn.Module) -> TiledKernel[list[Feature]]:
        """The tiled kernel: features per tile, contracted group by group."""
        return TiledKernel(
            lambda x: self.features(model, x),
            self.contract,
            lambda f, blocks: self.contract_blocks(f, f, blocks),
        )

    def features(self, model: nn.Module, x: Tensor) -> list[Feature]:
        """Gram features per "gram" group; the "grads" and embedding groups' per-sample
        gradients as :class:`StreamedGrads`, formed only while contracted; elementwise
        groups' gradients side by side in one (T, K, ΣP) tensor; then scattered,
        parametrized and fallback gradients, one tensor each."""
        grams: list[Feature] = []
        gradients: list[Tensor] = []
        elementwise: list[Tensor] = []
        pending: list[_PendingGrads] = []
        if self.groups:
            uses, cotangents = self._capture(model, x)
            t = len(x)
            for group in self.groups:
                made = self._group_features(group, uses, cotangents, t)
                entry = self.materialized.get(group.key)
                if entry is not None:
                    made = pull_back(entry, _written(made[0]))
                for f in made:
                    if isinstance(f, _PendingGrads):
                        pending.append(f)
                    elif isinstance(f, Tensor):
                        (elementwise if group.kind == "elementwise" else gradients).append(f)
                    else:
                        grams.append(f)
        if elementwise:
            gradients.insert(0, torch.cat(elementwise, dim=2))
        if self.fallback:
            gradients.append(per_sample_jacobians(model, self.fallback, x))
        streamed: list[Feature] = [StreamedGrads([pending])] if pending else []
        return grams + streamed + gradients

    def _capture(self, model: nn.Module, x: Tensor) -> tuple[list[Use], dict[int, Tensor]]:
        """One forward pass recording uses, then the cotangents of all K outputs at once."""
        derived = {key: w.norm for key, w in self.weight_norms.items()}
        with materialized(self.materialized, self.weight_norms) as weights:
            recorder = Recorder(self.params | weights, self.aranges, derived)
            # math SDPA: the flash kernel's backward has no batching rule, so the batched
            # backward of the K outputs would loop over them
            with torch.enable_grad(), recorder, sdpa_kernel(SDPBackend.MATH):
                out = model_output(model, x).reshape(len(x), -1)
        uses = recorder.uses
        if [u.signature for u in uses] != self.signatures or any(
            layout is not None and u.source.shape[layout.axis] != len(x) * layout.fold
            for u, layout in zip(uses, self.layouts, strict=True)
        ):
            raise NtkLensError(
                f"the model made other calls on a batch of {len(x)} than on the probe "
                "batches (data-dependent control flow?); use method='jacobian'"
            )
        return uses, self._cotangents(uses, out)

    def _cotangents(self, uses: list[Use], out: Tensor) -> dict[int, Tensor]:
        """The cotangents of all K outputs ``out`` (T, K) at the recorded uses' outputs
        that the groups need, by the output's id: one batched backward pass."""
        needed = sorted(
            {i for g in self.groups for i in g.uses}
            | {i for g in self.groups if g.bias for i, u in enumerate(uses) if u.key == g.bias}
        )
        outputs: dict[int, Tensor] = {}
        for i in needed:
            outputs.setdefault(id(uses[i].output), uses[i].output)
        k, t = self.n_outputs, len(out)
        basis = torch.eye(k, dtype=out.dtype, device=out.device)[:, None, :].expand(k, t, k)
        grads = torch.autograd.grad(
            out,
            list(outputs.values()),
            grad_outputs=basis,
            is_grads_batched=True,
            allow_unused=True,
            materialize_grads=True,
        )
        return dict(zip(outputs, grads, strict=True))

    def _group_features(
        self, group: _Group, uses: list[Use], cotangents: dict[int, Tensor], t: int
    ) -> list[Feature | _PendingGrads]:
        parts = [(uses[i], self.layouts[i]) for i in group.uses]
        if group.kind == "elementwise":
            grads = sum(_elementwise_grads(u, lay, cotangents[id(u.output)], t) for u, lay in parts)
            assert isinstance(grads, Tensor)
            return [grads]
        if group.kind == "scatter":
            return [self._scattered_grads(group, parts, cotangents, t)]
        feats = [_gram_parts(u, lay, cotangents[id(u.output)], t) for u, lay in parts]
        cot = torch.cat([f[1] for f in feats], dim=-1) if len(feats) > 1 else feats[0][1]
        if group.kind == "embedding":
            tokens = torch.cat([f[0] for f in feats], dim=-1) if len(feats) > 1 else feats[0][0]
            if group.mode == "gram":
                return [GramFeatures(None, tokens, cot, bias=0.0)]
            pending = _PendingGrads(cot, tokens, vocab=group.n_entries // group.out_dim)
            return [pending if self._streams(group) else _written(pending)]
        inputs = torch.cat([f[0] for f in feats], dim=-1) if len(feats) > 1 else feats[0][0]
        if group.weight_norm is not None:
            return self._weight_norm_features(group, inputs, cot)
        if group.mode == "gram":
            shared = group.cotangents == "shared" and _same_for_all(cot)
            gated = group.cotangents == "gated" and not self.full
            return [GramFeatures(inputs, None, cot, group.bias_square, shared, gated)]
        if group.bias is not None:  # the bias as one more input, constant c
            c = math.sqrt(group.bias_square)
            ones = inputs.new_full((*inputs.shape[:2], 1, inputs.shape[3]), c)
            inputs = torch.cat([inputs, ones], dim=2)
        pending = _PendingGrads(cot, inputs)
        return [pending if self._streams(group) else _written(pending)]

    def _scattered_grads(
        self,
        group: _Group,
        parts: list[tuple[Use, Layout | None]],
        cotangents: dict[int, Tensor],
        t: int,
    ) -> Tensor:
        """Per-sample gradients (T, K, P) of a parameter whose uses see it through
        overlapping views (a tied embedding and head, ``.T`` and a slice), summed in the
        parameter's own layout.

        Row-major (T·K, P), so that every contraction reads it without a copy. A use that
        sees each entry at most once is gathered row by row (``index_select`` over P); only
        a use that repeats entries is scattered (``index_add_`` entries first, one transpose).
        An embedding's gradients are added last, at the entries its tokens select
        (``scatter_add_``), instead of formed through a one-hot product and copied in.
        """
        k = self.n_outputs
        like = parts[0][0].output
        entry = self.materialized.get(group.key)
        n_entries = math.prod(entry.shape) if entry else self.params[group.key].numel()
        rows: Tensor | None = None
        repeated: Tensor | None = None
        used = list(zip(group.uses, parts, strict=True))
        dense = [(i, u, lay) for i, (u, lay) in used if u.rule != "embedding"]
        lookups = [(u, lay) for _, (u, lay) in used if u.rule == "embedding"]
        arange = self.aranges.get(group.key)
        for i, u, lay in dense:
            g = _use_grads(u, lay, cotangents[id(u.output)], t).reshape(t * k, -1)
            flat = u.idx.reshape(-1).to(like.device)
            if i not in self.gathers:
                self.gathers[i] = _gather_index(flat, n_entries)
            source = self.gathers[i]
            if rows is None and _whole_tensor(u.idx, arange):  # the use's layout is the tensor's
                rows = g
            elif source is not None and _plain_view(u.idx, arange):
                # a strided view of the tensor (.T, a slice): a strided copy, not a gather
                by_entry = g.view(t * k, *u.idx.shape)
                if rows is None:
                    fill = torch.empty if len(flat) == n_entries else torch.zeros
                    rows = fill(t * k, n_entries, dtype=like.dtype, device=like.device)
                    _entries_view(rows, u.idx).copy_(by_entry)
                else:
                    _entries_view(rows, u.idx).add_(by_entry)
            elif source is not None:
                if len(flat) < n_entries:  # entries this use does not see read a zero column
                    g = F.pad(g, (0, 1))
                gathered = g.index_select(1, source)
                rows = gathered if rows is None else rows.add_(gathered)
            else:
                if repeated is None:
                    repeated = torch.zeros(n_entries, t * k, dtype=like.dtype, device=like.device)
                repeated.index_add_(0, flat, g.T)
        if rows is None:
            rows = torch.zeros(t * k, n_entries, dtype=like.dtype, device=like.device)
        if repeated is not None:
            rows += repeated.T
        for u, lay in lookups:  # added where the tokens point, not through a one-hot product
            tokens, cot = _gram_parts(u, lay, cotangents[id(u.output)], t)
            dim, length = cot.shape[3], cot.shape[4]
            entries = (
                u.idx[0].to(tokens.device, torch.long)[:, tokens].permute(1, 0, 2)
            )  # (T, d, L)
            index = entries.reshape(t, 1, dim * length).expand(t, k, dim * length)
            rows.view(t, k, n_entries).scatter_add_(2, index, cot.reshape(t, k, dim * length))
        return rows.view(t, k, n_entries)

    def _weight_norm_features(self, group: _Group, inputs: Tensor, cot: Tensor) -> list[Feature]:
        """Θ = Σ_r c_r² ⟨gW_r, gW'_r⟩ + (1 - c_r²)(u_r·gW_r)(u_r·gW'_r), W_r = g_r u_r,
        u_r = v_r/‖v_r‖, c_r = g_r/‖v_r‖: the weight's Gram and a rank-C correction,
        with a folded bias's per-sample gradients Σ_l G_l (weight c² for an input c)
        beside it. Shared or gated cotangents (one position, a trace kernel) keep the
        correction factored: shared ones are gated with gates 1."""
        u, c, w = self._normalized(group)
        au = F.linear(inputs[:, 0].transpose(1, 2), u).transpose(1, 2)  # (T, C, L)
        n_vectors, (t, k, _, n_rows, length) = len(w) // len(c), cot.shape
        scale = c[:, None]
        scaled = cot * scale
        shared = group.cotangents == "shared" and _same_for_all(scaled)
        factors = None
        if not self.full and length == 1:
            if shared:
                factors = (cot.new_ones(t, 1, n_rows, 1), cot[0])
            elif group.cotangents == "gated":
                factors = _gated_factors(cot)
        gated = factors is not None and not shared  # the Gram's factors: of scaled cotangents
        own = (factors[0], factors[1] * scale) if factors is not None and gated else None
        gram = GramFeatures(inputs, None, scaled, 0.0, shared, gated, own)
        if factors is not None:
            gates, directions = factors[0][:, 0, :, 0], factors[1][:, 0, :, 0]  # (T, C), (K, C)
            stacked = gates.new_empty(t, n_vectors * n_rows)
            torch.mul(gates, au[..., 0], out=stacked[:, :n_rows])
            stacked[:, n_rows:] = gates
            d = directions.repeat(1, n_vectors)
            return [gram, WeightedGrads(w, gates=stacked, directions=d)]
        vectors = cot.new_empty(t, k, n_vectors * n_rows)
        g = cot[:, :, 0]  # (T, K, C, L)
        if length == 1:
            torch.mul(g[..., 0], au[:, None, :, 0], out=vectors[..., :n_rows])
            vectors[..., n_rows:] = g[..., 0]
        else:
            torch.einsum("tkcl,tcl->tkc", g, au, out=vectors[..., :n_rows])
            torch.sum(g, dim=-1, out=vectors[..., n_rows:])
        return [gram, WeightedGrads(w, vectors)]

    def _normalized(self, group: _Group) -> tuple[Tensor, Tensor, Tensor]:
        """(u (C, D), c (C,), w): a weight-normed tensor's directions, scales and the
        weights of its correction (1 - c²) and folded bias (c² of its input)."""
        wn = group.weight_norm
        assert wn is not None
        if group.key not in self.normalized:
            v = self.params[wn.v].detach()
            v = v.reshape(len(v), -1)
            norm = v.norm(dim=1)
            c = self.params[wn.g].detach().reshape(-1) / norm
            weights = [1 - c * c]
            if group.bias is not None:
                weights.append(c.new_full(c.shape, group.bias_square))
            self.normalized[group.key] = (v / norm[:, None], c, torch.cat(weights))
        return self.normalized[group.key]

    def contract(self, f1: list[Feature], f2: list[Feature]) -> Tensor:
        """The kernel block between two tiles: the sum of every group's contribution."""
        return self.contract_blocks(f1, f2, [(slice(None), slice(None))])[0]

    def contract_blocks(
        self, f1: list[Feature], f2: list[Feature], blocks: list[tuple[slice, slice]]
    ) -> list[Tensor]:
        """The kernel blocks (rows of ``f1``, cols of ``f2``) of two tiles (a diagonal
        tile's sub-blocks with ``f1 is f2``): streamed gradients are formed once per piece
        and tile, for all blocks."""
        first = f1[0]
        like = first.cotangents if isinstance(first, GramFeatures) else first
        like = like.w if isinstance(like, WeightedGrads) else like
        like = like.groups[0].cotangents if isinstance(like, StreamedGrads) else like
        n1, n2 = len(first), len(f2[0])
        out = [
            empty_block(like, len(range(n1)[r]), len(range(n2)[c]), self.n_outputs, self.full)
            for r, c in blocks
        ]
        with torch.no_grad():
            for a, b in zip(f1, f2, strict=True):
                if isinstance(a, StreamedGrads) and isinstance(b, StreamedGrads):
                    self._add_streamed(out, blocks, a, b)
                    continue
                for block, (r, c) in zip(out, blocks, strict=True):
                    if isinstance(a, GramFeatures) and isinstance(b, GramFeatures):
                        _add_gram_product(block, a[r], b[c])
                    elif isinstance(a, WeightedGrads) and isinstance(b, WeightedGrads):
                        _add_weighted_product(block, a[r], b[c])
                    else:
                        assert isinstance(a, Tensor) and isinstance(b, Tensor)
                        add_jacobian_product(block, a[r], b[c])
        return out

    def _add_streamed(
        self,
        out: list[Tensor],
        blocks: list[tuple[slice, slice]],
        a: StreamedGrads,
        b: StreamedGrads,
    ) -> None:
        pieces = a.pieces(max(len(a), len(b)), per_output=not self.full)
        left = self._buffer("left", a, pieces)
        right = left if b is a else self._buffer("right", b, pieces)
        for piece in pieces:
            ga = a.formed(left, piece)
            gb = ga if b is a else b.formed(right, piece)
            for block, (r, c) in zip(out, blocks, strict=True):
                add_jacobian_product(block, ga[r], gb[c])

    def _buffer(self, side: str, grads: StreamedGrads, pieces: list[Piece]) -> Tensor:
        """This plan's reused memory for ``side``, grown to the largest of ``pieces``."""
        like = grads.groups[0].cotangents
        numel = max(grads.piece_numel(piece) for piece in pieces)
        buffer = self.buffers.get(side)
        if (
            buffer is None
            or buffer.numel() < numel
            or buffer.dtype != like.dtype
            or buffer.device != like.device
        ):
            buffer = self.buffers[side] = like.new_empty(numel)
        return buffer


# --- plan ----------------------------------------------------------------------------


def _detach_shared_chains(uses_a: list[Use], uses_b: list[Use], out: Tensor) -> None:
    """Unattach a bias added to f·o (o a linear use's output) where o, or a step to f·o,
    has another consumer: then o's cotangent is not f times the sum's, and no fold."""
    consumers: dict[object, int] = defaultdict(int)
    seen: set[object] = set()
    stack = [out.grad_fn] if out.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for parent, _ in node.next_functions:
            if parent is not None:
                consumers[parent] += 1
                stack.append(parent)
    for use_a, use_b in zip(uses_a, uses_b, strict=False):
        chain = use_b.chain
        if chain and any(consumers.get(t.grad_fn, 0) != 1 for t in chain):
            use_a.attached_to = use_b.attached_to = None


def _key_groups(
    key: str,
    indices: list[int],
    uses: list[Use],
    layouts: list[Layout | None],
    k: int,
    n_pairs: float,
    full: bool,
    derived: WeightNorm | None,
    arange: Tensor | None,
) -> list[_Group] | None:
    """The groups of one tracked tensor's uses (None: a weight norm that does not fit)."""
    classes: list[list[int]] = []
    for i in indices:
        for cls in classes:
            first = uses[cls[0]]
            if _family(first) == _family(uses[i]) and torch.equal(first.idx, uses[i].idx):
                cls.append(i)
                break
        else:
            classes.append([i])
    if derived is not None:
        if len(classes) != 1 or _family(uses[indices[0]]) != "gram":
            return None
        first = uses[indices[0]]
        identity = _whole_tensor(first.idx, arange) or torch.equal(
            first.idx.reshape(-1), torch.arange(first.idx.numel(), dtype=first.idx.dtype)
        )
        if first.idx.shape[0] != 1 or not identity:
            return None
    if not (len(classes) == 1 and _plain_view(uses[classes[0][0]].idx, arange)) and _overlap(
        [uses[cls[0]].idx for cls in classes]
    ):
        return [_scatter_group(key, indices, uses, layouts)]
    groups = []
    for cls in classes:
        family = _family(uses[cls[0]])
        dims = [_dims(uses[i], layouts[i]) for i in cls]
        n_groups, _, in_dim, out_dim = dims[0]
        positions = sum(d[1] for d in dims)
        n_entries = uses[cls[0]].idx.numel()
        if family == "elementwise":
            kind: Literal["gram", "embedding", "elementwise", "scatter"] = "elementwise"
            group = _Group(key, tuple(cls), kind, "grads", 1, positions, 1, n_entries, n_entries)
        else:
            kind = "embedding" if family == "embedding" else "gram"
            group = _Group(
                key, tuple(cls), kind, "gram", n_groups, positions, in_dim, out_dim, n_entries
            )
            if derived is not None:
                group = replace(group, weight_norm=derived)
            else:
                group = _cheaper_mode(group, k, n_pairs, full)
        groups.append(group)
    return groups


def _scatter_group(
    key: str, indices: list[int], uses: list[Use], layouts: list[Layout | None]
) -> _Group:
    """One group of per-sample gradients summed over all of a tensor's uses, in the
    tensor's own layout (overlapping views, or a parametrized tensor)."""
    entries = torch.cat([uses[i].idx.reshape(-1) for i in indices])
    n = int(entries.max()) + 1
    dims = [_dims(uses[i], layouts[i]) for i in indices]
    positions, in_dim, out_dim = (
        sum(d[1] for d in dims),
        max(d[2] for d in dims),
        max(d[3] for d in dims),
    )
    return _Group(key, tuple(indices), "scatter", "grads", 1, positions, in_dim, out_dim, n)


def _gather_index(flat: Tensor, n_entries: int) -> Tensor | None:
    """For a use that sees each of ``n_entries`` at most once (its flat index map ``flat``),
    the column of its gradients that holds each entry, ``len(flat)`` (a zero column) where
    it does not see it; None where it sees some entry twice."""
    if int(torch.bincount(flat, minlength=n_entries).max()) > 1:
        return None
    source = torch.full((n_entries,), len(flat), dtype=torch.long, device=flat.device)
    source[flat] = torch.arange(len(flat), device=flat.device)
    return source


def _entries_view(rows: Tensor, idx: Tensor) -> Tensor:
    """``rows`` (R, entries) seen through ``idx``, a strided view of the tensor's own index
    map (see :func:`_plain_view`): element [r, i…] is entry idx[i…] of row r."""
    strides = (rows.stride(0), *idx.stride())
    return rows.as_strided((len(rows), *idx.shape), strides, idx.storage_offset())


def _plain_view(idx: Tensor, arange: Tensor | None) -> bool:
    """Whether ``idx`` is a strided view of the tensor's own index map without repeats."""
    if arange is None or (0 in idx.stride() and idx.numel() > 1):
        return False
    return idx.untyped_storage().data_ptr() == arange.untyped_storage().data_ptr()


def _whole_tensor(idx: Tensor, arange: Tensor | None) -> bool:
    """Whether ``idx`` is the tensor's own index map itself: entry i at position i."""
    return (
        _plain_view(idx, arange)
        and arange is not None
        and idx.numel() == arange.numel()
        and idx.is_contiguous()
        and idx.storage_offset() == arange.storage_offset()
    )


def _overlap(maps: list[Tensor]) -> bool:
    """Whether some entry appears twice among the index maps."""
    entries = torch.cat([m.reshape(-1) for m in maps])
    return int(torch.bincount(entries).max()) > 1


def _family(use: Use) -> str:
    if use.rule in GRAM_RULES:
        return "gram"
    return "embedding" if use.rule == "embedding" else "elementwise"


def _dims(use: Use, layout: Layout | None) -> tuple[int, int, int, int]:
    """(groups, positions per sample, input features D, output features C) of a use."""
    assert layout is not None
    gr, c, d = use.idx.shape if use.idx.dim() == 3 else (1, use.idx.numel(), 1)
    n = use.source.shape[layout.axis] // layout.fold
    if use.rule == "linear":
        positions = use.source.numel() // (n * d)
    elif use.rule == "conv":
        positions = use.output.numel() // (n * gr * c)
    elif use.rule == "conv_transpose":
        positions = use.source.numel() // (n * gr * d)
    elif use.rule == "embedding":
        positions, d = use.source.numel() // n, 1
    else:
        positions = use.output.numel() // (n * use.idx.numel())
    return gr, positions, d, c


def _fold_biases(groups: list[_Group], uses: list[Use], params: dict[str, Tensor]) -> None:
    """Fold a bias into its weight's Gram where it is added at exactly that weight's uses."""
    by_key: dict[str, list[_Group]] = defaultdict(list)
    for g in groups:
        by_key[g.key].append(g)
    for bias, bias_groups in list(by_key.items()):
        if len(bias_groups) != 1 or bias not in params:
            continue
        (bias_group,) = bias_groups
        bias_uses = [uses[i] for i in bias_group.uses]
        if bias_group.kind != "elementwise" or any(u.rule != "shift" for u in bias_uses):
            continue
        attached = [u.attached_to for u in bias_uses]
        if None in attached:
            continue
        owners = [g for g in groups if g.kind == "gram" and set(attached) == set(g.uses)]
        if len(owners) != 1 or len(attached) != len(set(attached)):
            continue
        owner = owners[0]
        if owner.bias is not None:
            continue
        identity = torch.arange(params[bias].numel(), dtype=torch.int32)
        if not all(torch.equal(u.idx.reshape(-1), identity) for u in bias_uses):
            continue
        # the bias's gradient is c·Σ_l G_l in units of the weight use's scaled cotangent
        factors = {
            u.scale * u.relative / uses[a].scale if uses[a].scale else math.nan  # type: ignore[index]
            for u, a in zip(bias_uses, attached, strict=True)
        }
        if len(factors) != 1 or math.isnan(next(iter(factors))):
            continue
        if any(uses[a].rule == "conv_transpose" for a in attached):  # type: ignore[index]
            continue
        c = next(iter(factors))
        groups[groups.index(owner)] = replace(owner, bias=bias, bias_square=c * c)
        groups.remove(bias_group)


def _describe(g: _Group, uses: list[Use], entry: Materialized | None = None) -> str:
    rules = sorted({f"{uses[i].rule} [{uses[i].via}]" for i in g.uses})
    n = len(g.uses)
    what = ", ".join(rules) + (f" ×{n}" if n > 1 else "")
    if entry is not None:
        return f"{what} of {entry.key} = {entry.via}(…) (per-sample gradients, then its vjp)"
    if g.kind == "scatter":
        return f"{what} (per-sample gradients, overlapping views)"
    if g.mode == "grads":
        return f"{what} (per-sample gradients)"
    structure = {"shared": ", shared cotangents", "gated": ", gated cotangents"}
    gram = f"(gram{structure.get(g.cotangents, '')})"
    return f"weight_norm of {what} {gram}" if g.weight_norm is not None else f"{what} {gram}"


def _describe_bias(g: _Group) -> str:
    into = "Gram" if g.mode == "gram" else "per-sample gradients"
    return f"bias folded into {g.key}'s {into}"


# --- features ------------------------------------------------------------------------


def _scaled(t: Tensor, scale: float) -> Tensor:
    """``t * scale``, without the copy where the scale is one."""
    return t if scale == 1.0 else t * scale


def _split(t: Tensor, axis: int, layout: Layout, n: int) -> Tensor:
    """``t`` with its sample axis first, as (n, fold, other dims...)."""
    return t.movedim(axis, 0).unflatten(0, (n, layout.fold))


def _gram_parts(use: Use, layout: Layout | None, grad: Tensor, t: int) -> tuple[Tensor, Tensor]:
    """(inputs (T, Gr, D, L) or tokens (T, L), cotangents (T, K, Gr, C, L)) of a use."""
    assert layout is not None
    k = grad.shape[0]
    if use.rule in ("linear", "embedding"):
        if use.out_perm is not None:
            grad = grad.permute(0, *(p + 1 for p in use.out_perm))
        g = _split(grad, 1 + layout.axis, layout, t).movedim(2, 1)
        g = _scaled(g.reshape(t, k, -1, g.shape[-1]).transpose(2, 3).unsqueeze(2), use.scale)
        data = use.data
        assert data is not None
        if use.rule == "embedding":
            tokens = _split(data, layout.axis, layout, t).reshape(t, -1)
            padding = use.conv.get("padding_idx")
            if padding is not None:
                padding = padding % use.idx.shape[-1]
                g = g * (tokens != padding)[:, None, None, None, :]
            return tokens, g
        rows = _split(data, layout.axis, layout, t)
        inputs = rows.reshape(t, -1, rows.shape[-1]).transpose(1, 2).unsqueeze(1)
        return inputs, g
    conv = use.conv
    groups, fold = conv["groups"], layout.fold
    x = use.data
    assert x is not None
    if use.rule == "conv":
        patches = _patches(x, conv["kernel"], conv["stride"], conv["padding"], conv["dilation"])
        patches = patches.reshape(t, fold, groups, -1, patches.shape[-1])
        inputs = patches.permute(0, 2, 3, 1, 4).reshape(t, groups, patches.shape[3], -1)
        g = grad.reshape(k, t, fold, groups, grad.shape[2] // groups, -1)
        g = g.permute(1, 0, 3, 4, 2, 5).reshape(t, k, groups, g.shape[4], -1)
        return inputs, _scaled(g, use.scale)
    inputs = x.reshape(t, fold, groups, x.shape[1] // groups, -1)
    inputs = inputs.permute(0, 2, 3, 1, 4).reshape(t, groups, x.shape[1] // groups, -1)
    patches = _transpose_patches(grad.flatten(0, 1), x.shape[2:], conv)
    patches = patches.reshape(k, t, fold, groups, patches.shape[1] // groups, -1)
    g = patches.permute(1, 0, 3, 4, 2, 5).reshape(t, k, groups, patches.shape[4], -1)
    return inputs, _scaled(g, use.scale)


def _use_grads(use: Use, layout: Layout | None, grad: Tensor, t: int) -> Tensor:
    """A use's per-sample gradients (T, K, entries) in its canonical layout."""
    if use.rule in ("scale", "shift"):
        return _elementwise_grads(use, layout, grad, t)
    first, cot = _gram_parts(use, layout, grad, t)
    if use.rule == "embedding":
        return _embedding_grads(first, cot, use.idx.shape[1], use.idx.shape[2])
    return _weight_grads(cot, first)


def _elementwise_grads(use: Use, layout: Layout | None, grad: Tensor, t: int) -> Tensor:
    """Per-sample gradients of a broadcast "scale" or "shift" parameter: (T, K, entries)."""
    assert layout is not None and use.pshape is not None
    prod = grad * use.data if use.data is not None else grad
    k = grad.shape[0]
    prod = prod.expand(k, *use.output.shape)
    axis = layout.axis
    rest = use.pshape[:axis] + use.pshape[axis + 1 :]
    # one reduction over the folded rows and the broadcast dims (split: (T, fold, K, rest))
    dims = [1] + [3 + i for i, size in enumerate(rest) if size == 1]
    summed = _split(prod, 1 + axis, layout, t).sum(dim=dims)
    return _scaled(summed.reshape(t, k, -1), use.scale)


def _weight_grads(cotangents: Tensor, inputs: Tensor, out: Tensor | None = None) -> Tensor:
    """Per-sample weight gradients Σ_l G_{ial} ⊗ A_{il} as (T, K, Gr·C·D), into ``out``
    (which may be a slice of a wider tensor)."""
    t, k, gr, c, length = cotangents.shape
    d = inputs.shape[2]
    if out is None:
        out = torch.empty(t, k, gr * c * d, dtype=cotangents.dtype, device=cotangents.device)
    if gr > 1:  # grouped convolutions: one matmul per sample and group
        out.copy_(torch.einsum("tkgcl,tgdl->tkgcd", cotangents, inputs).reshape(t, k, -1))
        return out
    _per_sample_matmuls(cotangents.reshape(t, k, c, length), inputs.reshape(t, d, length).mT, out)
    return out


def _embedding_grads(
    tokens: Tensor, cotangents: Tensor, dim: int, vocab: int, out: Tensor | None = None
) -> Tensor:
    """Per-sample embedding gradients in the (1, d, V) canonical layout: (T, K, d·V), into
    ``out`` (which may be a slice of a wider tensor)."""
    t, k = cotangents.shape[:2]
    if out is None:
        out = torch.empty(t, k, dim * vocab, dtype=cotangents.dtype, device=cotangents.device)
    one_hot = F.one_hot(tokens, vocab).to(cotangents.dtype)  # (T, L, V)
    _per_sample_matmuls(cotangents.reshape(t, k, dim, -1), one_hot, out)
    return out


def _per_sample_matmuls(left: Tensor, right: Tensor, out: Tensor) -> None:
    """``out[t, a]`` = ``left[t, a] @ right[t]`` flattened: (T, K, C, L) @ (T, L, D) into a
    contiguous (T, K, C·D) ``out``, one batched matmul over the samples.

    The cotangents ``left`` come output-major from the batched backward; reshaping them
    sample-major copies them, but they are far smaller than the gradients.
    """
    t, k, c, length = left.shape
    torch.bmm(left.reshape(t, k * c, length), right, out=out.view(t, k * c, right.shape[-1]))


@dataclass(frozen=True)
class _PendingGrads:
    """A group's per-sample gradients Σ_l G_{ial} ⊗ A_{il} (T, K, P), not yet formed: the
    cotangents (T, K, Gr, C, L) and the inputs (T, Gr, D, L) or, for an embedding of
    ``vocab`` entries, the tokens (T, L). :meth:`write` forms a range of the channels C."""

    cotangents: Tensor
    right: Tensor
    vocab: int = 0

    def __len__(self) -> int:
        return len(self.cotangents)

    def __getitem__(self, rows: slice) -> _PendingGrads:
        return replace(self, cotangents=self.cotangents[rows], right=self.right[rows])

    @property
    def channels(self) -> int:
        return self.cotangents.shape[3]

    @property
    def entries_per_channel(self) -> int:
        return self.vocab or self.cotangents.shape[2] * self.right.shape[2]

    def write(self, out: Tensor, channels: slice, outputs: slice = slice(None)) -> None:
        """The gradients of the entries of ``channels`` for ``outputs`` into ``out``
        (T, K', P'), contiguous."""
        cot = self.cotangents[:, outputs, :, channels]
        if self.vocab:
            _embedding_grads(self.right, cot, cot.shape[3], self.vocab, out)
        else:
            _weight_grads(cot, self.right, out)


def _written(pending: Feature | _PendingGrads) -> Tensor:
    """The gradients of one group in a tensor of their own, formed if still pending."""
    if not isinstance(pending, _PendingGrads):
        assert isinstance(pending, Tensor)
        return pending
    t, k = pending.cotangents.shape[:2]
    like = pending.cotangents
    out = like.new_empty(t, k, pending.channels * pending.entries_per_channel)
    pending.write(out, slice(None))
    return out


#: Bytes of per-sample gradients formed at a time (per side of a block): larger groups
#: are formed a range of their channels at a time.
_PIECE_BYTES = 16 * 2**20


@dataclass
class StreamedGrads:
    """The per-sample gradients of a tile's "grads" and embedding groups, formed only
    while contracted, a :class:`Piece` (a range of a group's channels, for all outputs or
    one, of at most ``_PIECE_BYTES``) at a time, into buffers reused across pieces and
    blocks.

    A tile's gradients are often hundreds of MiB, and writing them into fresh memory costs
    about four times forming them (page faults: 25 ms against 6.5 ms for 52 MiB on 2
    cores), so they are never all held; the captured inputs and cotangents they are formed
    from are smaller by about L·(D + K·C) / (K·C·D). A tile captured in chunks of samples
    keeps the chunks (``chunks[c][group]``) and forms each piece from all of them, rather
    than copying the chunks' captures into one tensor per group.
    """

    chunks: list[list[_PendingGrads]]

    def __len__(self) -> int:
        return sum(len(chunk[0]) for chunk in self.chunks)

    def __getitem__(self, rows: slice) -> StreamedGrads:
        start, stop, step = rows.indices(len(self))
        assert step == 1, "tiles are contiguous"
        kept, offset = [], 0
        for chunk in self.chunks:
            n = len(chunk[0])
            lo, hi = max(start - offset, 0), min(stop - offset, n)
            if lo < hi:
                kept.append(chunk if (lo, hi) == (0, n) else [g[lo:hi] for g in chunk])
            offset += n
        return StreamedGrads(kept)

    @staticmethod
    def join(parts: list[StreamedGrads]) -> StreamedGrads:
        """The gradients of consecutive chunks of samples as one, without copying."""
        return StreamedGrads([chunk for part in parts for chunk in part.chunks])

    @property
    def groups(self) -> list[_PendingGrads]:
        """The first chunk's groups: the shapes every chunk shares but for its samples."""
        return self.chunks[0]

    def pieces(self, t: int, per_output: bool) -> list[Piece]:
        """Pieces of at most ``_PIECE_BYTES`` for ``t`` samples (at least one channel
        each), the same for both tiles of a block: each group's channel ranges, for all K
        outputs together or, ``per_output`` (the trace kernel), one output at a time.

        One output's cotangents are a strided view of the batched backward's (K, T, …)
        result that a batched matmul reads in place; all K together must first be copied
        sample-major."""
        out = []
        for i, g in enumerate(self.groups):
            k = g.cotangents.shape[1]
            outputs = [slice(a, a + 1) for a in range(k)] if per_output else [slice(0, k)]
            width = 1 if per_output else k
            channel_bytes = t * width * g.entries_per_channel * g.cotangents.element_size()
            step = max(1, min(g.channels, _PIECE_BYTES // max(channel_bytes, 1)))
            out += [
                Piece(i, a, slice(c, min(c + step, g.channels)))
                for a in outputs
                for c in range(0, g.channels, step)
            ]
        return out

    def _outputs(self, piece: Piece) -> int:
        return len(range(self.groups[piece.group].cotangents.shape[1])[piece.outputs])

    def piece_numel(self, piece: Piece) -> int:
        """Entries of ``piece`` for all samples."""
        g = self.groups[piece.group]
        n_channels = len(range(g.channels)[piece.channels])
        return len(self) * self._outputs(piece) * n_channels * g.entries_per_channel

    def formed(self, buffer: Tensor, piece: Piece) -> Tensor:
        """The gradients of ``piece`` (T, K', P'), formed at the start of ``buffer``."""
        grads = buffer[: self.piece_numel(piece)].view(len(self), self._outputs(piece), -1)
        offset = 0
        for chunk in self.chunks:
            n = len(chunk[piece.group])
            chunk[piece.group].write(grads[offset : offset + n], piece.channels, piece.outputs)
            offset += n
        return grads


class Piece(NamedTuple):
    """A part of a tile's streamed gradients: one group's ``channels`` for ``outputs``."""

    group: int
    outputs: slice
    channels: slice


Feature = Tensor | GramFeatures | WeightedGrads | StreamedGrads


def _per_dim(value: object, spatial: int) -> tuple[int, ...]:
    return (value,) * spatial if isinstance(value, int) else tuple(value)  # type: ignore[arg-type]


def _patches(
    x: Tensor, kernel: tuple[int, ...], stride: object, padding: object, dilation: object
) -> Tensor:
    """The (T, Gr·D, L) input patches that a convolution multiplies with its weight.

    D runs over (input channel, kernel offsets) like the weight's entries, L over output
    positions. Built from strided views and one copy (faster than ``F.unfold`` on CPU).
    """
    spatial = len(kernel)
    strides, dilations = _per_dim(stride, spatial), _per_dim(dilation, spatial)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilations, strict=True)]
        pads = [p for total in reversed(totals) for p in (total // 2, total - total // 2)]
    elif padding == "valid":
        pads = []
    else:
        pads = [p for p in reversed(_per_dim(padding, spatial)) for _ in range(2)]
    if any(pads):
        x = F.pad(x, pads)
    return _windows(x, kernel, strides, dilations)


def _transpose_patches(grad: Tensor, in_shape: torch.Size, conv: dict) -> Tensor:
    """Patches of a transposed convolution's output cotangent, one per input position:
    ∂/∂W[ci, co, k] = Σ_p x[ci, p] G[co, p·s + k·d - pad]. Shape (T, Cout·kk, L_in)."""
    kernel = conv["kernel"]
    spatial = len(kernel)
    strides, dilations = _per_dim(conv["stride"], spatial), _per_dim(conv["dilation"], spatial)
    paddings = _per_dim(conv["padding"], spatial)
    pads = []
    for dim in reversed(range(spatial)):
        needed = (in_shape[dim] - 1) * strides[dim] + dilations[dim] * (kernel[dim] - 1) + 1
        right = needed - grad.shape[2 + dim] - paddings[dim]
        pads += [paddings[dim], right]
    return _windows(F.pad(grad, pads), kernel, strides, dilations)


def _windows(
    x: Tensor, kernel: tuple[int, ...], strides: tuple[int, ...], dilations: tuple[int, ...]
) -> Tensor:
    spatial = len(kernel)
    windows = x
    for dim, (k, s, d) in enumerate(zip(kernel, strides, dilations, strict=True)):
        windows = windows.unfold(2 + dim, d * (k - 1) + 1, s)
    windows = windows[(..., *(slice(None, None, d) for d in dilations))]
    offsets = range(2 + spatial, 2 + 2 * spatial)
    positions = range(2, 2 + spatial)
    windows = windows.permute(0, 1, *offsets, *positions)
    return windows.reshape(len(x), -1, math.prod(windows.shape[2 + spatial :]))


# --- contraction and costs -------------------------------------------------------------


def _input_gram(f1: GramFeatures, f2: GramFeatures) -> Tensor:
    """Σ_d A_igdl A_jgdm as (Gr, T1, L, T2, M), or (T1, T2) for one position and group."""
    if f1.tokens is not None and f2.tokens is not None:
        s = (f1.tokens[:, :, None, None] == f2.tokens[None, None]).to(f1.cotangents.dtype)
        return s[None]
    a1, a2 = f1.inputs, f2.inputs
    assert a1 is not None and a2 is not None
    if a1.shape[1] == 1 and a1.shape[-1] == 1:
        return a1.reshape(len(a1), -1) @ a2.reshape(len(a2), -1).T
    return torch.einsum("igdl,jgdm->giljm", a1, a2)


def _add_gram_product(block: Tensor, f1: GramFeatures, f2: GramFeatures) -> None:
    """Add Σ_{g,l,m} (A_il · A_jm)(G_ial · G_jbm) to the block (traced over a=b if 2-D)."""
    g1, g2 = f1.cotangents, f2.cotangents
    t1, k, _, c, _ = g1.shape
    t2 = len(g2)
    full = block.dim() == 4
    if _shared_is_cheaper(f1, full) and f2.shared and torch.equal(g1[0], g2[0]):
        _add_shared_gram_product(block, f1, f2)
        return
    s = _input_gram(f1, f2)
    if f1.bias:
        s += f1.bias
    if not full and f1.gated and f2.gated:
        factors1, factors2 = f1.factors(), f2.factors()
        if factors1 is not None and factors2 is not None:
            _add_gated_gram_product(block, s, factors1, factors2)
            return
    if s.dim() == 2:
        if full:
            gg = (g1.reshape(t1 * k, c) @ g2.reshape(t2 * k, c).T).view(t1, k, t2, k)
            block.addcmul_(gg, s[:, None, :, None])
        else:
            block.addcmul_(g1.reshape(t1, -1) @ g2.reshape(t2, -1).T, s)
        return
    if full:
        gg = torch.einsum("iagcl,jbgcm->gialjbm", g1, g2)
        block.add_(torch.einsum("giljm,gialjbm->iajb", s, gg))
    else:
        gg = torch.einsum("iagcl,jagcm->giljm", g1, g2)
        block.add_(torch.einsum("giljm,giljm->ij", s, gg))


def _add_gated_gram_product(
    block: Tensor, s: Tensor, gated1: tuple[Tensor, Tensor], gated2: tuple[Tensor, Tensor]
) -> None:
    """The traced Gram product for cotangents G_iagcl = γ_igcl u_agcl: with
    U_gclm = Σ_a u_agcl u'_agcm, Σ_a,c G_iagcl G'_jagcm = Σ_c γ_igcl U_gclm γ'_jgcm, so a
    pair costs Gr·L²·(D + C) in place of Gr·L²·(D + K·C). One position l at a time keeps
    the temporaries at T·Gr·C·L."""
    (gates1, u1), (gates2, u2) = gated1, gated2
    if s.dim() == 2:  # one group, one position: Σ_c γ_ic U_c γ'_jc
        mixed = (u1 * u2).sum(0).reshape(-1)
        gg = (gates1.reshape(len(gates1), -1) * mixed) @ gates2.reshape(len(gates2), -1).T
        block.addcmul_(gg, s)
        return
    mixed = torch.einsum("agcl,agcm->glcm", u1, u2)
    for position in range(gates1.shape[-1]):
        weighted = gates2 * mixed[:, position]  # (T2, Gr, C, M)
        rows = gates1[..., position]  # (T1, Gr, C)
        r = torch.einsum("igc,jgcm->gijm", rows, weighted)
        block.add_(torch.einsum("gijm,gijm->ij", s[:, :, position], r))


#: Cost of factoring gated cotangents, in matmul FLOPs per cotangent entry (measured: about
#: 25 elementwise passes over the projections, each far slower per entry than a matmul FLOP).
_FACTORING_FLOPS = 400


def _gating_pays(g: _Group, k: int, n_pairs: float) -> bool:
    """Whether factoring a gated group's cotangents (per sample, ``_FACTORING_FLOPS`` per
    entry of its K·Gr·C·L) costs less than it saves on ``n_pairs`` traced pairs per
    sample: 2(K - 1)·Gr·C·L² each, and as much again per weight-norm correction vector."""
    saved = 2 * (k - 1) * g.n_groups * g.out_dim * g.positions**2
    if g.weight_norm is not None and g.positions == 1:
        saved *= 3 if g.bias is not None else 2
    return n_pairs * saved > _FACTORING_FLOPS * k * g.n_groups * g.out_dim * g.positions


#: Random unit vectors over the K outputs that :func:`_gated_factors` projects on.
_GATE_PROBES = 4


def _gated_factors(cot: Tensor) -> tuple[Tensor, Tensor] | None:
    """Cotangents (T, K, Gr, C, L) as gates (T, Gr, C, L) times directions (K, Gr, C, L)
    shared by the samples, or None where they do not factor so (to rounding).

    One pass projects every sample's cotangent vector (over K) on a few fixed random
    unit vectors r_j. Per entry (g, c, l) the direction is the sample's vector with the
    largest projection on any r_j, scaled so that its projection on that r_j is 1; the
    gates are then the samples' projections on it, and the factors must reproduce the
    projections on every r_j, which a vector outside the direction's span fails with
    probability one. Any factorization that reproduces the cotangents gives the exact
    kernel, so tiles need not agree on it."""
    t, k = cot.shape[:2]
    # entries in memory order, so that flattening them is a view, not a copy
    order = sorted(range(2, cot.dim()), key=lambda d: -cot.stride(d))
    cot = cot.permute(0, 1, *order)
    rest = cot.shape[2:]
    generator = torch.Generator().manual_seed(0)
    probes = torch.randn(_GATE_PROBES, k, generator=generator, dtype=torch.float64)
    probes = (probes / probes.norm(dim=1, keepdim=True)).to(cot)
    flat = cot.reshape(t, k, -1)
    # projections (J, T, E): every step below then reads contiguous slabs of T·E entries
    if flat.stride(1) > flat.stride(0):  # outputs outermost (a batch-folded use): one matmul
        projected = (probes @ flat.transpose(0, 1).reshape(k, -1)).view(len(probes), t, -1)
    else:
        projected = torch.einsum("jk,tke->jte", probes, flat)
    # per entry the probe with the largest projection, and on it the sample with the
    # largest: its vector, scaled to projection 1, is the direction (no T·K·E temporary)
    best = projected.abs().amax(dim=1).argmax(dim=0)  # (E,)
    gates = projected.gather(0, best.expand(1, t, -1))[0]  # (T, E)
    sample = gates.abs().argmax(dim=0)
    picked = flat.gather(0, sample[None, None].expand(1, k, -1))[0]  # (K, E)
    scale = gates.gather(0, sample[None])[0]
    directions = picked / torch.where(scale == 0, 1.0, scale)
    residual = projected - (probes @ directions)[:, None] * gates
    size = gates.abs() * torch.linalg.vector_norm(directions, dim=0)
    tolerance = max(1e3, 4.0 * k) * torch.finfo(cot.dtype).eps
    if bool((residual.abs() - tolerance * size).amax() > 0):
        return None
    back = [0, *(1 + order.index(d) for d in range(2, 2 + len(order)))]
    return gates.reshape(t, *rest).permute(back), directions.reshape(k, *rest).permute(back)


def _same_for_all(cot: Tensor) -> bool:
    """Whether every sample's cotangents (T, ...) are the same."""
    return bool(torch.equal(cot, cot[:1].expand_as(cot)))


def _cotangent_structure(cot: Tensor, gating: bool) -> Literal["general", "shared", "gated"]:
    """How a use's cotangents (T, K, Gr, C, L) on the probe batch are structured:
    "shared" (the same for every sample), "gated" (see :func:`_gated_factors`; only
    tried where ``gating`` would pay) or "general"."""
    if _same_for_all(cot):
        return "shared"
    return "gated" if gating and _gated_factors(cot) is not None else "general"


def _shared_is_cheaper(f: GramFeatures, full: bool) -> bool:
    """Whether the shared-cotangent contraction costs fewer FLOPs per pair than the general
    one: Gr·D·L (·K² for a full kernel) against Gr·L²·(D + K·C) (K²·C for a full kernel).
    With one position and a full kernel the general one is cheaper (D + K²C < K²D)."""
    if not f.shared or f.inputs is None:
        return False
    _, k, groups, c, positions = f.cotangents.shape
    d = f.inputs.shape[2]
    outputs = k * k if full else k
    shared = groups * d * positions * (k * k if full else 1)
    general = groups * positions * positions * (d + outputs * c)
    return shared < general


def _add_shared_gram_product(block: Tensor, f1: GramFeatures, f2: GramFeatures) -> None:
    """The Gram product when every sample has the same cotangents G: with
    Γ_ab[g,l,m] = Σ_c G_agcl G_bgcm, the block is Σ_{g,d,l} A_igdl (A_j Γ_abᵀ)_gdl, plus
    c² Σ Γ_ab for a folded bias. Per pair Gr·D·L in place of Gr·L²·(D + K·C)."""
    a1, a2 = f1.inputs, f2.inputs
    assert a1 is not None and a2 is not None
    g = f1.cotangents[0]  # (K, Gr, C, L)
    if block.dim() == 4:
        gamma = torch.einsum("agcl,bgcm->abglm", g, g)
        y = torch.einsum("jgdm,abglm->jabgdl", a2, gamma)
        block.add_(torch.einsum("igdl,jabgdl->iajb", a1, y))
        if f1.bias:
            block.add_(f1.bias * gamma.sum(dim=(2, 3, 4))[None, :, None, :])
        return
    gamma = torch.einsum("agcl,agcm->glm", g, g)
    y = torch.einsum("jgdm,glm->jgdl", a2, gamma)
    block.add_(a1.reshape(len(a1), -1) @ y.reshape(len(y), -1).T)
    if f1.bias:
        block.add_(f1.bias * gamma.sum())


def _captured_entries(g: _Group, k: int) -> int:
    """Entries per sample of the inputs and K cotangents that ``g``'s capture keeps."""
    return g.n_groups * g.positions * (g.in_dim + k * g.out_dim)


def _grad_entries(g: _Group) -> int:
    """Entries of ``g``'s per-sample gradients (a gram group's folded bias included)."""
    return g.n_entries if g.kind != "gram" else g.n_groups * g.out_dim * g.in_dim


def _group_costs(g: _Group, k: int, full: bool) -> tuple[float, float, float, float]:
    """FLOPs per sample, FLOPs per pair, feature elements per sample, pair temporaries."""
    k_pair = k * k if full else k
    if g.mode == "grads":
        n_entries = _grad_entries(g)
        form = 2 * k * g.positions * max(n_entries, g.n_groups * g.out_dim * g.in_dim)
        return form, 2 * k_pair * n_entries, k * n_entries, 0.0
    squares = g.n_groups * g.positions**2
    n_products = k * k if full else 1
    feature = g.n_groups * g.positions * (g.in_dim + k * g.out_dim)
    cotangent_dim = g.out_dim if g.cotangents == "gated" and not full else k_pair * g.out_dim
    pair = 2 * squares * (g.in_dim + cotangent_dim) + squares * n_products
    shared = 2 * g.n_groups * g.in_dim * g.positions * n_products  # _add_shared_gram_product
    if g.cotangents == "shared" and g.weight_norm is None and shared < pair:
        return shared * g.positions, shared, feature, 0.0
    if g.weight_norm is not None:  # the rank-C correction, and a folded bias's gradients
        vectors = 2 if g.bias is not None else 1
        gated = g.cotangents == "gated" and not full and g.positions == 1
        pair += 2 * (1 if gated else k_pair) * g.out_dim * vectors
        feature += k * g.out_dim * vectors
    return 0.0, pair, feature, squares * (1 + n_products)


def _cheaper_mode(group: _Group, k: int, n_pairs: float, full: bool) -> _Group:
    """``group`` in the mode with fewer FLOPs for ``n_pairs`` pairs per featurized sample."""

    def flops(g: _Group) -> float:
        per_sample, per_pair, _, _ = _group_costs(g, k, full)
        return per_sample + n_pairs * per_pair

    return min((replace(group, mode="gram"), replace(group, mode="grads")), key=flops)
