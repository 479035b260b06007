"""Test-session set-up: 8 fake CPU devices for mesh tests, no network, shared fixtures."""

import os

# Must be set before JAX initialises its backend: multi-device code is tested on 8 CPU devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
for _offline in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_offline] = "1"
