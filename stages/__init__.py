"""The command line's stages (`python -m stages.run ...`).

Nothing is downloaded at run time: the hub is set offline here, before anything imports
huggingface_hub (it reads HF_HUB_OFFLINE once, at import), unless the caller set it.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
