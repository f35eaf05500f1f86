"""Replaying real renders against the plain references of _references.py: ``replayed(adapter)``
wraps every StorySync attention processor of a render, recomputes each call from the inputs it
was given, and ``assert_render_replays`` checks that every call matched and that sharing and RFH
acted; ``rendered_by_the_reference`` renders with the references in place of the processors."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from _references import Did, expected_flux_attention, expected_self_attention

from storysync_dist.core.state import ROLE_ANCHORS, ROLE_FRAMES, StorySyncState
from storysync_dist.models.attention import StorySyncSelfAttnProcessor
from storysync_dist.models.flux import FluxStorySyncProcessor

# Float32 processors against float64 references: the last bits of a layer's output.
RTOL, ATOL = 1e-4, 1e-4


# ---- replaying real renders ------------------------------------------------------------------------
@dataclass
class LayerCall:
    """One StorySync attention call of a render: what it returned, what the reference says."""

    name: str
    step: int
    role: str
    got: Any
    want: Any
    did: Did


@dataclass
class Replay:
    calls: list[LayerCall] = field(default_factory=list)

    def shared_keys(self, role: str | None = None) -> int:
        return sum(c.did.shared for c in self.calls if role in (None, c.role))

    def moved_patches(self, role: str | None = None) -> int:
        return sum(c.did.moved for c in self.calls if role in (None, c.role))

    def assert_match(self) -> None:
        """Every call returned what the reference says, within float32 rounding."""
        assert self.calls
        for c in self.calls:
            assert_layer_output(c.got, c.want, c.did, f"{c.role} {c.name} step {c.step}")


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a.float(), b.float(), rtol=RTOL, atol=ATOL)


def assert_layer_output(got: Any, want: Any, did: Did, what: str = "") -> None:
    """``got`` is the reference's output within float32 rounding; a batch row where an Otsu tie
    can fall either way (``Did.alternatives``) may instead be one of the other right outputs.
    For FLUX's (image, text) pair RFH touches the image part only."""
    for stage, product, reference in did.stages:
        torch.testing.assert_close(product.float(), reference.float(), rtol=RTOL, atol=ATOL,
                                   msg=lambda m, stage=stage: f"{what}, {stage}: {m}")
    pair = isinstance(got, tuple)
    got_rows, want_rows = (got[0], want[0]) if pair else (got, want)
    if pair:
        torch.testing.assert_close(got[1].float(), want[1].float(), rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")
    for row in range(got_rows.shape[0]):
        if _close(got_rows[row], want_rows[row]):
            continue
        variants = [(v[0] if pair else v)[row] for r, v in did.alternatives if r == row]
        if any(_close(got_rows[row], v) for v in variants):
            continue
        torch.testing.assert_close(got_rows[row].float(), want_rows[row].float(), rtol=RTOL, atol=ATOL,
                                   msg=lambda m, row=row: f"{what} row {row}: {m}")


def call_and_expect(proc: Any, attn: Any, hidden_states: torch.Tensor, *args: Any, masks: torch.Tensor | None = None,
                    **kwargs: Any) -> tuple[Any, Any, Did]:
    """Run a StorySync attention processor, then the plain reference on the same inputs: (what the
    product returned, what the reference says, what the reference did). The features the product
    handed to RFH are kept, checked against the reference's and harmonized by the reference, so
    Otsu's gate sees the same scores on both sides (``plain_rfh``)."""
    st = proc.state
    harmonize, captured = st.harmonize, []

    def keep_input(name: str, features: torch.Tensor, *rest: Any) -> torch.Tensor:
        captured.append(features.detach().clone())
        return harmonize(name, features, *rest)

    st.harmonize = keep_input
    try:
        got = proc(attn, hidden_states, *args, **kwargs)
    finally:
        del st.harmonize
    assert len(captured) <= 1
    rfh_in = captured[0] if captured else None
    bound = inspect.signature(proc.__call__).bind(attn, hidden_states, *args, **kwargs).arguments
    context = bound.get("encoder_hidden_states")
    if isinstance(proc, FluxStorySyncProcessor):
        assert bound.get("attention_mask") is None and bound.get("image_rotary_emb") is not None
        text_len = context.shape[1] if context is not None else proc.text_len
        want, did = expected_flux_attention(attn, hidden_states, context, bound["image_rotary_emb"], st, proc.name,
                                            proc.shares, text_len, masks=masks, rfh_in=rfh_in)
    else:
        # A self-attention: no context (UNet) or its own input (Kandinsky 3), no mask.
        assert (context is None or context is hidden_states) and bound.get("attention_mask") is None
        want, did = expected_self_attention(attn, hidden_states, st, proc.name, proc.shares, masks=masks,
                                            rfh_in=rfh_in)
    return got, want, did


class _Tee:
    """Runs the product's processor and the plain reference on the same inputs, and logs both."""

    def __init__(self, proc: Any, replay: Replay) -> None:
        self.proc = proc
        self.replay = replay

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        step, role = self.proc.state.step, self.proc.state.role
        got, want, did = call_and_expect(self.proc, attn, hidden_states, *args, **kwargs)
        self.replay.calls.append(LayerCall(self.proc.name, step, role, got, want, did))
        return got


@contextmanager
def replayed(adapter: Any) -> Iterator[Replay]:
    """While the block renders with ``adapter``, every StorySync attention call is checked against
    the plain reference afterwards (``Replay.assert_match``)."""
    replay = Replay()
    install = adapter.install

    def install_and_tee(state: StorySyncState) -> None:
        install(state)
        denoiser = getattr(adapter.pipe, "unet", None) or adapter.pipe.transformer
        denoiser.set_attn_processor({
            name: _Tee(p, replay) if isinstance(p, (StorySyncSelfAttnProcessor, FluxStorySyncProcessor)) else p
            for name, p in denoiser.attn_processors.items()
        })

    adapter.install = install_and_tee
    try:
        yield replay
    finally:
        del adapter.install


def assert_render_replays(replay: Replay, *, roles: tuple[str, ...] = (ROLE_ANCHORS, ROLE_FRAMES)) -> None:
    """A StorySync render did the right thing: every layer call matched the reference, and in
    each of ``roles`` shared keys were let in and RFH moved patches (so neither was vacuous)."""
    replay.assert_match()
    for role in roles:
        assert replay.shared_keys(role) > 0, f"{role}: no shared key in the whole render"
        assert replay.moved_patches(role) > 0, f"{role}: RFH moved no patch in the whole render"


class _Substitute:
    """The plain reference in place of a UNet-style StorySync self-attention processor: the
    state's bookkeeping (the step's masks are fixed at the first shared layer) and the output."""

    def __init__(self, proc: StorySyncSelfAttnProcessor) -> None:
        self.proc = proc
        self._signature = inspect.signature(proc.__call__)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        proc, st = self.proc, self.proc.state
        bound = self._signature.bind(attn, hidden_states, *args, **kwargs).arguments
        context = bound.get("encoder_hidden_states")
        assert (context is None or context is hidden_states) and bound.get("attention_mask") is None
        if proc.shares:
            st.enter_shared_layer(proc.name)
        assert not (st.role == ROLE_ANCHORS and st.config.share_attention), "the substitute publishes nothing"
        assert not st.config.harmonize, "RFH's Otsu ties fall by rounding: compare RFH by replaying"
        return expected_self_attention(attn, hidden_states, st, proc.name, proc.shares)[0]


@contextmanager
def rendered_by_the_reference(adapter: Any) -> Iterator[None]:
    """While the block renders with a UNet-style ``adapter``, the plain reference replaces every
    StorySync self-attention (frames, without RFH)."""
    install = adapter.install

    def install_reference(state: StorySyncState) -> None:
        install(state)
        unet = adapter.pipe.unet
        unet.set_attn_processor({name: _Substitute(p) if isinstance(p, StorySyncSelfAttnProcessor) else p
                                 for name, p in unet.attn_processors.items()})

    adapter.install = install_reference
    try:
        yield
    finally:
        del adapter.install


def assert_frames_independent(adapter: Any, plan: Any, first: str = "snow", second: str = "city") -> tuple[Replay, Any]:
    """Render the plan's anchors and two frames in sequence under a replay (every StorySync
    attention call must return what the plain reference computes), then the second frame alone
    and from the bundle's bytes: all three give the same pixels (a frame depends on its own inputs
    and the bundle only). Returns the replay and the bundle for the family's own checks."""
    import numpy as np

    from storysync_dist.core.anchors import AnchorBundle
    from storysync_dist.engine.renderer import StoryRenderer

    renderer = StoryRenderer(adapter, plan.config, plan.settings)
    with replayed(adapter) as replay:
        _, bundle = renderer.render_anchors(plan.anchor_jobs)
        in_sequence = [renderer.render_frame(plan.jobs[f], bundle).image for f in (first, second)]
    assert_render_replays(replay)
    alone = StoryRenderer(adapter, plan.config, plan.settings).render_frame(plan.jobs[second], bundle).image
    assert np.array_equal(np.asarray(in_sequence[1]), np.asarray(alone))  # companions do not matter
    imported = AnchorBundle.from_bytes(bundle.to_bytes())
    assert np.array_equal(np.asarray(renderer.render_frame(plan.jobs[second], imported).image), np.asarray(alone))
    return replay, bundle
