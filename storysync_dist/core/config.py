"""Every constant of the StorySync method in one dataclass, the paper's values as defaults.

The config is written into every frame's metadata (``config`` column, JSON), so a frame records
exactly how it was made. Values the paper leaves open are documented in ``docs/method.md``, whose
"The paper's settings and ours" lists which defaults are the paper's and which the project's.

A config comes from three places, later ones winning (``resolve_config``): the story file's
``storysync:`` section, an ablation (``--ablation``, the rows of the paper's Table 3a) and
``--set key=value`` overrides. Every value is checked here, with one-line errors naming the key
(:class:`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .bli_schedule import BLI_WINDOWS, bli_schedule

__all__ = [
    "ABLATIONS",
    "BLI_LATENTS",
    "BLI_LAYERS",
    "BLI_TARGETS",
    "BLI_WINDOWS",
    "MASK_SOURCES",
    "SHARE_DROPOUT_SCOPES",
    "TOKEN_SAMPLINGS",
    "ConfigError",
    "StorySyncConfig",
    "default_anchor_dtype",
    "parse_set_options",
    "resolve_config",
]

MASK_SOURCES = ("current", "previous", "window")
SHARE_DROPOUT_SCOPES = ("layer", "resolution")
BLI_LATENTS = ("own", "consistent")
BLI_LAYERS = ("all", "shared")
# "mask", then the StoryDiffusion releases of core/storydiffusion.py (its RELEASES).
TOKEN_SAMPLINGS = ("mask", "storydiffusion-predict", "storydiffusion-lowvram")
BLI_TARGETS = ("query", "output")
ANCHOR_DTYPES = ("float16", "bfloat16", "float32")


def default_anchor_dtype(model_dtype: str) -> str:
    """``anchor_dtype`` when the config leaves it to the model (None): bfloat16 for a bfloat16
    model (in float16 its states could overflow above 65,504 and lose their smallest values),
    float16 for float16 models and for float32 ones. A float32 model (the CPU renders) keeps the
    half-precision stream DESIGN.md sizes and the bundles have always had: float32 would double the
    bytes every frame pulls, and anchors in float16 are what a GPU job of the same story sends."""
    return "bfloat16" if str(model_dtype).removeprefix("torch.") == "bfloat16" else "float16"


class ConfigError(ValueError):
    """A config key that does not exist, or a value of the wrong type or out of range."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class StorySyncConfig:
    """Knobs of StorySync (section 3 of the paper).

    Switches (all on for ``--method storysync``; all off reproduces stock diffusers):
      share_attention: masked cross-image attention sharing, Eq. 5-8 (and Eq. 13 for anchors).
      harmonize: Regional Feature Harmonization (RFH), Eq. 9-11.
      layout_interpolation: Base Layout Interpolation (BLI), Eq. 12.
      use_masks: restrict sharing and RFH to subject masks, Eq. 2-4 (off = the "No Mask" ablation).
    """

    share_attention: bool = True
    harmonize: bool = True
    layout_interpolation: bool = True
    use_masks: bool = True

    # Eq. 11: harmonization coefficient gamma (paper: 0.3).
    rfh_gamma: float = 0.3
    # Eq. 9: temperature tau of the region-compatibility softmax (paper gives no value).
    rfh_tau: float = 0.1
    # Eq. 12: interpolation weight lambda towards the vanilla branch (paper: 0.7).
    bli_lambda: float = 0.7
    # Eq. 12: T, the number of leading steps with BLI, as a fraction of the steps (paper gives no value).
    bli_fraction: float = 0.3
    # Eq. 12: what is interpolated. "query": the consistent branch's queries are blended with the
    # vanilla branch's before attention (Figure 2 caches the base model's queries), so shared keys
    # keep their full weight; "output": the self-attention outputs after to_out (the old reading).
    bli_target: str = "query"
    # ConsiStory's vanilla query blending as released (its QueryStore); the defaults keep StorySync's BLI.
    # Which steps blend (core/layout.py ``bli_schedule``): "leading", the first round(bli_fraction x
    # steps) steps; "while_sharing", the steps from first_shared_step() through floor(bli_fraction x
    # steps), inclusive (the release: 1 .. steps // 10).
    bli_window: str = "leading"
    # None: lambda is bli_lambda at every BLI step; a number: lambda falls linearly from bli_lambda to
    # this over the window (numpy.linspace(bli_lambda, bli_lambda_end, K)[step]; the release 0.9 -> 0.81836735).
    bli_lambda_end: float | None = None
    # Which self-attention layers blend: "all" of them, or only the "shared" ones (share_layers; the
    # release blends where it shares, the decoder).
    bli_layers: str = "all"
    # The vanilla branch's latents: "own", its own trajectory from the same noise (StorySync); or
    # "consistent", the consistent branch's latents of the step (the release runs the stock UNet on
    # the current latents before each blending step): its rows run only at blending steps and their
    # noise is dropped.
    bli_latents: str = "own"

    # Section 3.3 dropouts (rates not given in the paper); seeded per frame, step and layer.
    share_dropout: float = 0.3
    rfh_dropout: float = 0.2
    mask_dropout: float = 0.1
    # What one share-dropout draw covers: "layer", one per querying image, step and layer; "resolution",
    # one per key image (anchor), step and resolution, used by every layer of that resolution and every
    # querying image (ConsiStory's release: its AttentionStore's last_mask_dropout). Keyed by the
    # anchor's seed, so frames redraw exactly what the anchors drew without it being shipped.
    share_dropout_scope: str = "layer"

    # Which self-attention layers share and harmonize (the paper names none; the project's choice):
    # prefixes of diffusers attention-processor names. None: the model family's default
    # (``ModelInfo.share_layers``; UNet: the decoder, "up_blocks", as ConsiStory and the DESIGN
    # sizing assume), filled in before a job is planned.
    share_layers: tuple[str, ...] | None = None
    # Cross-attention layers whose maps may make the subject mask (Eq. 3): prefixes. Of those that
    # recorded a map for the mask (see mask_source), the ones at the lowest resolution are averaged.
    # None: the family's default (UNet: every cross-attention).
    mask_layers: tuple[str, ...] | None = None
    # Eq. 2-4, "only from the current generation timestep": "current" builds the masks of step t
    # from the maps of step t's cross-attentions that run before the first shared self-attention
    # (UNet: the encoder and the mid block), so sharing can start at step 0; "previous" builds
    # them from the whole of step t-1 (no sharing at step 0); "window" (ConsiStory's release) from
    # the maps of the last mask_window steps up to t-1, averaged over layers and steps, each subject
    # thresholded on its own at each resolution and the masks united (no sharing at step 0).
    mask_source: str = "current"
    mask_window: int = 20
    # Which anchor tokens are shared. "mask": the subject tokens (Eq. 5, with share_dropout), as
    # StorySync and ConsiStory do; "storydiffusion-predict" (the --method storydiffusion baseline)
    # or "storydiffusion-lowvram": StoryDiffusion's RandSample (its Eq. 1) over every token of the
    # anchors at its per-resolution rates, no mask, with the early-step and skip rules of that
    # release of its code (core/storydiffusion.py; docs/evaluation.md, "storydiffusion").
    token_sampling: str = "mask"
    # RFH (Eq. 9-11) runs at the steps in [rfh_start, rfh_end) of the run, as fractions of the
    # steps (StorySync: every step; ConsiStory's feature injection: the 10%..33% window).
    rfh_start: float = 0.0
    rfh_end: float = 1.0
    # Apply sharing/RFH in the unconditional guidance branch too (masks always come from the
    # conditional branch). The paper does not discuss guidance: the project's choice.
    share_uncond: bool = True
    # No sharing or RFH before this step.
    first_share_step: int = 0
    # Precision of the anchor state that is stored and broadcast. None: the model's, filled in when a
    # job is set up (``with_anchor_dtype``, before fingerprints): bfloat16 for a bfloat16 model,
    # float16 for float16 and float32 models (``default_anchor_dtype``).
    anchor_dtype: str | None = None
    # ConsiStory's feature injection as released (its Sec. 3.3, core/consistory.py): not a StorySync
    # mechanism. Every image renders twice; pass 2 moves subject patches of the finest
    # self-attention layers towards their nearest anchor patch on pass 1's DIFT features.
    feature_injection: bool = False

    def __post_init__(self) -> None:
        # Canonical values (1 -> 1.0, lists -> tuples), so equal configs have equal JSON and
        # equal frame fingerprints however they were written.
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _check_value(f.name, getattr(self, f.name)))
        if self.token_sampling != "mask" and self.use_masks:
            raise ConfigError("token_sampling", f"{self.token_sampling} samples every token, without a subject "
                              "mask: set use_masks: false with it")

    @classmethod
    def vanilla(cls) -> StorySyncConfig:
        """Every mechanism off: the pipeline renders exactly as stock diffusers."""
        return cls(share_attention=False, harmonize=False, layout_interpolation=False)

    @property
    def any_mechanism(self) -> bool:
        return self.share_attention or self.harmonize or self.layout_interpolation or self.feature_injection

    @property
    def render_passes(self) -> int:
        """How many times every image is denoised: 2 with feature injection (ConsiStory's pass 1
        makes the DIFT features and masks pass 2 injects by), else 1."""
        return 2 if self.feature_injection else 1

    @property
    def needs_masks(self) -> bool:
        return self.use_masks and (self.share_attention or self.harmonize)

    def bli_steps(self, num_steps: int) -> int:
        """T of Eq. 12 for a run of ``num_steps`` denoising steps: BLI's window is steps 0 .. T-1
        (``bli_window``; the steps that blend are :meth:`bli_schedule`'s)."""
        if not self.layout_interpolation:
            return 0
        schedule = self.bli_schedule(num_steps)
        return max(schedule) + 1 if schedule else 0

    def bli_schedule(self, num_steps: int) -> dict[int, float]:
        """{step: lambda} of the steps at which BLI blends (``core.layout.bli_schedule``)."""
        if not self.layout_interpolation:
            return {}

        return bli_schedule(num_steps, self.bli_fraction, self.bli_lambda, self.bli_lambda_end, self.bli_window,
                            self.first_shared_step())

    def harmonizes_at(self, step: int, num_steps: int) -> bool:
        """Whether RFH runs at ``step`` of a ``num_steps`` run (the [rfh_start, rfh_end) window)."""
        return self.harmonize and self.rfh_start * num_steps <= step < self.rfh_end * num_steps

    def first_shared_step(self) -> int:
        """The first step at which sharing and RFH can run (masks from step t-1 need t >= 1)."""
        needs_previous = self.needs_masks and self.mask_source in ("previous", "window")
        return max(self.first_share_step, 1 if needs_previous else 0)

    def replace(self, **changes: Any) -> StorySyncConfig:
        return dataclasses.replace(self, **changes)

    def with_layers(self, share_layers: tuple[str, ...], mask_layers: tuple[str, ...]) -> StorySyncConfig:
        """This config with the layers it leaves to the model family (None) filled in."""
        changes: dict[str, Any] = {}
        if self.share_layers is None:
            changes["share_layers"] = tuple(share_layers)
        if self.mask_layers is None:
            changes["mask_layers"] = tuple(mask_layers)
        return self.replace(**changes) if changes else self

    def for_model(self, feature_injection: bool) -> StorySyncConfig:
        """This config for a model family that can (or cannot) record DIFT features: without them
        ``feature_injection`` is off (ConsiStory's one-pass form; its release is SDXL only)."""
        return self if feature_injection or not self.feature_injection else self.replace(feature_injection=False)

    def with_anchor_dtype(self, model_dtype: str) -> StorySyncConfig:
        """This config with ``anchor_dtype`` filled in for a model rendering in ``model_dtype`` when
        it is left to the model (None); a value the user set is kept."""
        if self.anchor_dtype is not None:
            return self
        return self.replace(anchor_dtype=default_anchor_dtype(model_dtype))

    def to_dict(self) -> dict[str, Any]:
        # What dataclasses.asdict gives (containers copied), without its per-value deep copy: a
        # job of 10^4 stories calls this a few times per story.
        data = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        for key in _PREFIXES:
            value = getattr(self, key)
            data[key] = None if value is None else list(value)
        for key, default in _LATER_DEFAULTS.items():
            if data[key] == default:
                del data[key]  # options added after datasets existed: absent at their defaults
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StorySyncConfig:
        """A config from a mapping of field names to values (a story's ``storysync:`` section, a
        bundle's meta); every key and value is checked (:class:`ConfigError`, naming the key)."""
        if not isinstance(data, Mapping):
            raise ConfigError("storysync", f"must be a mapping of option names to values, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(str(key), f"unknown option (options: {', '.join(sorted(known))})")
        values = {key: _check_value(key, value) for key, value in data.items()}
        return cls(**values)


# The type and range of every field; one place, used by __post_init__ and from_dict.
_UNIT_INTERVAL = ("rfh_gamma", "bli_lambda", "bli_fraction", "share_dropout", "rfh_dropout", "mask_dropout",
                  "rfh_start", "rfh_end")
_CHOICES = {"anchor_dtype": ANCHOR_DTYPES, "mask_source": MASK_SOURCES, "bli_target": BLI_TARGETS,
            "token_sampling": TOKEN_SAMPLINGS, "share_dropout_scope": SHARE_DROPOUT_SCOPES,
            "bli_latents": BLI_LATENTS, "bli_layers": BLI_LAYERS, "bli_window": BLI_WINDOWS}
_BOOLS = ("share_attention", "harmonize", "layout_interpolation", "use_masks", "share_uncond", "feature_injection")
_PREFIXES = ("share_layers", "mask_layers")
# Options added after datasets and bundles existed, with the value that behaves as before they did:
# ``to_dict`` (the ``config`` column, frame fingerprints, bundle metadata) leaves them out at that
# value, so configs that do not use them keep the dict, and the fingerprints, they always had;
# ``from_dict`` fills them back in.
_LATER_DEFAULTS: dict[str, Any] = {
    "share_dropout_scope": "layer", "bli_window": "leading", "bli_lambda_end": None, "bli_layers": "all",
    "bli_latents": "own", "mask_window": 20, "feature_injection": False,
}


def _check_value(key: str, value: Any) -> Any:
    """Check one field's value; return it in canonical form (floats as float, prefixes as tuple)."""
    if key in _BOOLS:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if key == "bli_lambda_end" and value is None:
        return None  # a constant lambda
    if key in _UNIT_INTERVAL or key in ("rfh_tau", "bli_lambda_end"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(key, f"must be a number, got {value!r}")
        if key == "rfh_tau" and not value > 0:
            raise ConfigError(key, f"must be > 0, got {value}")
        if key != "rfh_tau" and not 0.0 <= value <= 1.0:
            raise ConfigError(key, f"must be within [0, 1], got {value}")
        return float(value)
    if key == "first_share_step":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(key, f"must be a whole number >= 0, got {value!r}")
        return value
    if key == "mask_window":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(key, f"must be a whole number >= 1, got {value!r}")
        return value
    if key in _CHOICES:
        if key == "anchor_dtype" and value is None:
            return None  # the model's dtype (default_anchor_dtype)
        if value not in _CHOICES[key]:
            raise ConfigError(key, f"must be one of {', '.join(_CHOICES[key])}, got {value!r}")
        return value
    if key in _PREFIXES:
        if value is None:
            return None  # the model family's default
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items:
            raise ConfigError(key, f"must be a non-empty list of layer-name prefixes, got {value!r}")
        for item in items:
            if not isinstance(item, str) or not item.strip():
                raise ConfigError(key, f"must list non-empty layer-name prefixes, got {item!r}")
        return tuple(items)
    raise ConfigError(key, "unknown option")


# The rows of the paper's Table 3a: each switches one component off ("none" is the full method).
ABLATIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "no-mask": {"use_masks": False},
    "no-rfh": {"harmonize": False},
    # "Pose variation techniques (BLI and Dropouts)", section 4.3.
    "no-pose": {"layout_interpolation": False, "share_dropout": 0.0, "rfh_dropout": 0.0, "mask_dropout": 0.0},
}


def parse_set_options(items: list[str] | None) -> dict[str, Any]:
    """``["rfh_gamma=0.5", "share_layers=[up_blocks.0]"]`` -> ``{"rfh_gamma": 0.5, ...}``.

    Values are read as YAML scalars or flow lists (``0.5``, ``false``, ``query``, ``[a, b]``), as
    in a story file; the key and value are checked by :func:`resolve_config`.
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(item, "write --set key=value (for example --set rfh_gamma=0.5)")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(key, f"cannot read the value {text!r}") from None
        out[key] = value
    return out


def resolve_config(
    section: Mapping[str, Any] | None = None,
    ablation: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> StorySyncConfig:
    """The config of a job: defaults, then the story's ``storysync:`` section, then the ablation,
    then ``--set`` overrides (later wins). :class:`ConfigError` names the key at fault."""
    if ablation is not None and ablation not in ABLATIONS:
        raise ConfigError("ablation", f"must be one of {', '.join(ABLATIONS)}, got {ablation!r}")
    merged = {**dict(section or {}), **ABLATIONS.get(ablation or "none", {}), **dict(overrides or {})}
    return StorySyncConfig.from_dict(merged)


def _plain(value: Any) -> Any:
    """``value`` with its lists, tuples and dicts copied (as ``dataclasses.asdict`` copies them)."""
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value
