__version__ = "0.1.0"

import warnings as _warnings
# fastai decorates a few functions with `torch.jit.script`, which torch 2.10+ deprecates at import time: not ours to fix,
# and not something a user of the command lines should read at every start-up
_warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)

# registers the ConvViT classifiers with timm on `import fastconvmae`
from . import encoder as _encoder  # noqa: F401
