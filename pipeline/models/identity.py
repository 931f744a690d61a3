"""A cheap, content-based identity of a frozen module: what caches and checkpoints key on."""

from __future__ import annotations

import torch

from pipeline.storage.hashing import sha256_bytes, sha256_json


def module_identity(*modules: torch.nn.Module) -> str:
    """A cheap identity of frozen modules: class, config and the bytes of their first and last parameter.

    Hashing every weight of SDXL's text encoders would cost seconds per run; the probe tensors change with
    any retraining or different checkpoint, and the config catches architecture changes.
    """
    parts = []
    for module in modules:
        params = list(module.parameters())
        probes = [params[0], params[-1]] if params else []
        config = getattr(module, "config", None)
        config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
        config_dict = {k: v for k, v in config_dict.items() if not k.startswith("_")}  # drops name_or_path, version
        parts.append(
            {
                "class": type(module).__name__,
                "config": config_dict,
                "probes": [sha256_bytes(p.detach().float().cpu().numpy().tobytes()) for p in probes],
            }
        )
    return sha256_json(parts)
