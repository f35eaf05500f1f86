"""The single-process engine: anchors first, then the frames against the anchors' bundle.

Non-anchor frames render in batches of ``--frame-batch`` (one denoiser batch of [vanilla |
consistent] x guidance x frames). They never attend to each other, so a frame's pixels depend only
on (model, config, anchors, its prompt and seed), never on which other frames are rendered with
it, up to the float rounding a larger batch may bring (docs/memory.md). Frames rendered in the same run as the anchors
read the same half-precision bundle that an export/import round trip gives, so both are equal.
"""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..core.anchors import AnchorBundle, AnchorStep
from ..core.config import StorySyncConfig
from ..core.state import ROLE_ANCHORS, ROLE_FRAMES, MaskSourceError, StorySyncState
from ..errors import NonFiniteOutputError, StorySyncUserError
from ..models.family import Adapter


@dataclass(frozen=True, slots=True)  # slots: a job of 10^6 frames holds 10^6 of these
class FrameJob:
    """What one frame needs: its id, prompt, seed and the token positions of each subject."""

    frame_id: str
    index: int
    prompt: str
    # None: no negative prompt, as stock diffusers' pipe(prompt) (not the same as "").
    negative_prompt: str | None
    seed: int
    token_positions: list[list[int]]


@dataclass
class RenderedFrame:
    """One finished frame: the image and its subject mask at image size (or None)."""

    job: FrameJob
    image: Image.Image
    mask: np.ndarray | None
    seconds: float
    is_anchor: bool


@dataclass(frozen=True)
class RenderSettings:
    """Sampling settings shared by every frame of a job."""

    model: str
    steps: int
    height: int
    width: int
    guidance_scale: float
    # What else an anchor bundle records about how it was made (and is checked against).
    dtype: str = "float32"
    model_revision: str | None = None
    negative_prompt: str | None = None
    # --scheduler (a diffusers class name; None: the model's own) and --lora ((absolute path, scale,
    # sha256) each), applied to the pipeline by models.customize.apply_model_setup.
    scheduler: str | None = None
    loras: tuple[tuple[str, float, str], ...] = ()
    # The text length (tokens) where the family lets a story choose it (FLUX's max_sequence_length:
    # the model's own, or the story's defaults.max_sequence_length); None where it is fixed.
    max_sequence_length: int | None = None
    # FreeU's (s1, s2, b1, b2) where the method brings its own sampler (``core.methods.METHOD_SAMPLING``:
    # ``--method consistory`` on a family with FreeU, whose ``scheduler`` is then DDIM too); None: off.
    # Applied with the scheduler by models.customize.apply_model_setup, and undone for the next story.
    freeu: tuple[float, float, float, float] | None = None


@dataclass
class FrameOutput:
    """A finished frame as plain data (what a worker sends back to the driver)."""

    job: FrameJob
    image_png: bytes
    mask_png: bytes | None
    width: int
    height: int
    seconds: float
    is_anchor: bool


def png_bytes(image: Image.Image) -> bytes:
    """Lossless PNG encoding of a PIL image."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_frame(frame: RenderedFrame) -> FrameOutput:
    """PNG-encode a rendered frame and its mask (done where the frame was rendered)."""
    mask_png = None
    if frame.mask is not None:
        mask_png = png_bytes(Image.fromarray((frame.mask * 255).astype(np.uint8), mode="L"))
    return FrameOutput(
        job=frame.job, image_png=png_bytes(frame.image), mask_png=mask_png, width=frame.image.width,
        height=frame.image.height, seconds=frame.seconds, is_anchor=frame.is_anchor,
    )


class BundleMismatchError(ValueError):
    """An imported anchor bundle was made with other settings than this job."""


def bundle_meta(config: StorySyncConfig, settings: RenderSettings, anchors: list[FrameJob]) -> dict:
    """What an anchor bundle records about how it was made (``storysync-anchor-bundle/2``)."""
    return {
        **dataclasses.asdict(settings),
        "config": config.to_dict(),
        "num_anchors": len(anchors),
        "anchor_ids": [a.frame_id for a in anchors],
        "anchor_prompts": [a.prompt for a in anchors],
        "anchor_seeds": [a.seed for a in anchors],
        "anchor_token_positions": [[list(p) for p in a.token_positions] for a in anchors],
    }


# The settings an imported bundle must share with the job that uses it.
BUNDLE_SETTINGS = ("model", "dtype", "steps", "height", "width", "guidance_scale", "negative_prompt", "config",
                   "max_sequence_length")


class StoryRenderer:
    """Renders anchors and frames of one story with one pipeline on one device."""

    def __init__(self, adapter: Adapter, config: StorySyncConfig, settings: RenderSettings) -> None:
        self.adapter = adapter
        info = adapter.info
        # Layers and the anchor dtype the config leaves to the model are filled in here (a job has
        # done it already, so its config column and bundles hold the resolved values).
        self.config = (config.with_layers(info.share_layers, info.mask_layers).for_model(info.feature_injection)
                       .with_anchor_dtype(str(adapter.dtype)))
        self.settings = settings

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.adapter.latent_hw(self.settings.height, self.settings.width)

    @property
    def guidance(self) -> bool:
        """Whether the batch holds an unconditional branch (classifier-free guidance)."""
        return self.adapter.info.cfg_batch and self.settings.guidance_scale > 1.0

    def bundle_meta(self, anchors: list[FrameJob]) -> dict:
        return bundle_meta(self.config, self.settings, anchors)

    @staticmethod
    def check_bundle_meta(bundle: AnchorBundle, config: StorySyncConfig, settings: RenderSettings) -> None:
        """Refuse a bundle made with another model (or revision of it), precision, size, step
        count, guidance, negative prompt or config."""
        expected = bundle_meta(config, settings, [])
        made_config, our_config = bundle.meta.get("config"), expected["config"]
        if isinstance(made_config, dict) and made_config != our_config:
            keys = sorted(set(made_config) | set(our_config))
            diff = [f"{k}={made_config.get(k)!r} (this job: {our_config.get(k)!r})"
                    for k in keys if made_config.get(k) != our_config.get(k)]
            raise BundleMismatchError(f"anchor bundle was made with another config: {'; '.join(diff[:4])}")
        for key in BUNDLE_SETTINGS:
            if bundle.meta.get(key) != expected[key]:
                raise BundleMismatchError(
                    f"anchor bundle was made with {key}={bundle.meta.get(key)!r}, this job uses {expected[key]!r}"
                )
        made_freeu, our_freeu = _freeu(bundle.meta.get("freeu")), _freeu(settings.freeu)
        if made_freeu != our_freeu:  # JSON holds the tuple as a list
            raise BundleMismatchError(f"anchor bundle was made with FreeU {made_freeu}, this job uses {our_freeu}")
        made, ours = bundle.meta.get("model_revision"), settings.model_revision
        if made is not None and ours is not None and made != ours:
            raise BundleMismatchError(f"anchor bundle was made with model revision {made!r}, this job uses {ours!r}")

    def check_bundle(self, bundle: AnchorBundle) -> None:
        self.check_bundle_meta(bundle, self.config, self.settings)

    def _state(self, role: str, jobs: list[FrameJob], bundle: AnchorBundle | None) -> StorySyncState:
        return StorySyncState(
            self.config,
            role=role,
            seeds=[j.seed for j in jobs],
            token_positions=[j.token_positions for j in jobs],
            latent_hw=self.latent_hw,
            num_steps=self.settings.steps,
            guidance=self.guidance,
            text_len=self.settings.max_sequence_length or self.adapter.info.text_len,
            bundle=bundle,
            device=self.adapter.device,
        )

    def _run(
        self, state: StorySyncState, jobs: list[FrameJob], on_step: Callable[[int], None] | None
    ) -> tuple[list[Image.Image], torch.Tensor | None]:
        s = self.settings
        negatives = [j.negative_prompt for j in jobs]
        if any(n is None for n in negatives) and any(n is not None for n in negatives):
            raise ValueError("frames rendered together must all have a negative prompt, or none")
        self.adapter.install(state)
        try:
            for pass_index in range(state.passes):
                if pass_index:
                    state.begin_second_pass()  # ConsiStory: the same seeds, so the same latents, again
                offset = pass_index * s.steps

                def step_done(i: int, offset: int = offset) -> None:
                    if on_step is not None:
                        on_step(offset + i)  # the bundle's step numbering: pass 2 follows pass 1

                result = self.adapter.generate(
                    state,
                    [j.prompt for j in jobs],
                    None if negatives[0] is None else negatives,
                    [j.seed for j in jobs],
                    num_steps=s.steps,
                    height=s.height,
                    width=s.width,
                    guidance_scale=s.guidance_scale,
                    on_step=step_done,
                )
        except MaskSourceError as exc:  # a config that cannot give current-step masks
            raise StorySyncUserError(f"config: {exc}") from None
        finally:
            self.adapter.uninstall()
        return result.images, result.masks

    def render_anchors(
        self,
        anchors: list[FrameJob],
        on_step: Callable[[int], None] | None = None,
        on_publish: Callable[[int, AnchorStep | None], None] | None = None,
        keep_steps: bool = True,
    ) -> tuple[list[RenderedFrame], AnchorBundle]:
        """Render the anchor frames together (they share among themselves) and record the bundle.

        ``on_publish(t, anchor_step)`` is called as soon as step t is published (None for a step
        that publishes nothing, such as step 0 with ``mask_source="previous"``). With
        ``keep_steps=False`` each step is forgotten once handed to ``on_publish``, and the bundle
        returned holds the metadata only (a Ray anchor actor: the driver owns the steps).
        """
        start = time.perf_counter()
        state = self._state(ROLE_ANCHORS, anchors, None)

        def step_done(i: int) -> None:
            published = state.take_published(i, keep=keep_steps)  # waits for its host copies
            if on_publish is not None:
                on_publish(i, published)
            if on_step is not None:
                on_step(i)

        try:
            images, masks = self._run(state, anchors, step_done)
        except NonFiniteOutputError as exc:
            raise NonFiniteOutputError(f"anchors {[a.frame_id for a in anchors]}: {exc}") from None
        bundle = AnchorBundle(meta=self.bundle_meta(anchors), steps=state.published)
        seconds = (time.perf_counter() - start) / max(1, len(anchors))
        frames = [
            RenderedFrame(job, img, self._mask_image(masks, i), seconds, is_anchor=True)
            for i, (job, img) in enumerate(zip(anchors, images))
        ]
        return frames, bundle

    def render_frame(
        self, job: FrameJob, bundle: AnchorBundle | None, on_step: Callable[[int], None] | None = None
    ) -> RenderedFrame:
        """Render one non-anchor frame against the anchors' bundle (None for vanilla)."""
        return self.render_frames([job], bundle, on_step)[0]

    def render_frames(
        self, jobs: list[FrameJob], bundle: AnchorBundle | None, on_step: Callable[[int], None] | None = None
    ) -> list[RenderedFrame]:
        """Render non-anchor frames in one denoiser batch against the same bundle (None for vanilla).

        Frames never attend to each other: each keeps its own seed, noise, dropouts and masks, and
        shares only with the anchors, so a frame's pixels are its batch-of-one pixels up to the
        float rounding of a larger batch (docs/memory.md, "Frame batching"). The frames must all
        have a negative prompt or none (``frame_batches`` groups them so).
        """
        if not jobs:
            return []
        if bundle is not None:
            self.check_bundle(bundle)
        start = time.perf_counter()
        state = self._state(ROLE_FRAMES, jobs, bundle)
        try:
            images, masks = self._run(state, jobs, on_step)
        except NonFiniteOutputError as exc:
            names = jobs[0].frame_id if len(jobs) == 1 else [j.frame_id for j in jobs]
            raise NonFiniteOutputError(f"frame {names!r}: {exc}") from None
        seconds = (time.perf_counter() - start) / len(jobs)
        return [RenderedFrame(job, images[i], self._mask_image(masks, i), seconds, False) for i, job in enumerate(jobs)]

    def _mask_image(self, masks: torch.Tensor | None, i: int) -> np.ndarray | None:
        """Upsample image i's mask (nearest) to the image size."""
        if masks is None:
            return None
        s = self.settings
        mask = masks[i].float()[None, None]
        mask = torch.nn.functional.interpolate(mask, size=(s.height, s.width), mode="nearest")
        return mask[0, 0].bool().cpu().numpy()


def _freeu(value: list[float] | tuple[float, ...] | None) -> tuple[float, ...] | None:
    """FreeU's factors as ``RenderSettings.freeu`` holds them (a bundle's JSON meta: a list)."""
    return None if value is None else tuple(float(x) for x in value)


def frame_batches(jobs: list[FrameJob], batch: int) -> list[list[FrameJob]]:
    """Split frames, in order, into denoiser batches of at most ``batch``; a batch never mixes
    frames with a negative prompt and frames without one (their pipelines differ). The split
    depends only on the list and ``batch``, so every executor renders the same batches."""
    if batch < 1:
        raise ValueError(f"frame batch must be >= 1, not {batch}")
    batches: list[list[FrameJob]] = []
    for job in jobs:
        last = batches[-1] if batches else None
        if (last is not None and len(last) < batch
                and (last[0].negative_prompt is None) == (job.negative_prompt is None)):
            last.append(job)
        else:
            batches.append([job])
    return batches
