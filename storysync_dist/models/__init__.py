"""One adapter per model family (diffusers pipelines), the offline presets and the tokenizer."""

from __future__ import annotations

import logging


class _DropTorchvisionFallbackNotice(logging.Filter):
    """transformers announces, on first import of every CLIP/SigLIP image processor, that it falls
    back to the PIL one without torchvision. The UNet pipelines we load never use an image
    processor, so the notice says nothing to our users; every other transformers message stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionFallbackNotice())
