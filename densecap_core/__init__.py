"""DenseCap in PyTorch: the model library shared by the CLI, the stream worker and the job worker.

Importing this package does not import torch. The torch-free modules (``schema``, ``protocol``,
``settings``, ``imageio``) are what the gateway and client use; the model code lives in
``densecap_core.model`` and ``densecap_core.inference`` and imports torch.
"""

__version__ = "0.1.0"
