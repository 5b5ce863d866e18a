"""Training: run configs, data, DeepSpeed ZeRO over SP x DP, checkpoints, metrics, export.

Modules are imported on use (``lasp data`` does not pay for DeepSpeed's import)::

    from lasp.train.config import RunConfig
    from lasp.train.trainer import train
"""
