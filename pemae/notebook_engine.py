"""The papermill engine the pipeline's stages run their notebooks with (`papermill --engine pemae`).

Papermill's own nbclient engine, with the kernel's connection encrypted (jupyter_client's
`KernelManager.transport_encryption`): ipykernel no longer warns, in every stage's output, that
the kernel "is running over TCP without encryption". Registered as an entry point in
pyproject.toml; the notebooks run exactly as with the default engine.
"""

from __future__ import annotations

from papermill.engines import NBClientEngine
from traitlets.config import Config


KERNEL_CONFIG = {"KernelManager": {"transport_encryption": "auto"}}


class EncryptedKernelEngine(NBClientEngine):
    @classmethod
    def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
        kwargs.setdefault("config", Config(KERNEL_CONFIG))
        return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)
