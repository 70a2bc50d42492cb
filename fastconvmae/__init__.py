__version__ = "0.1.0"

import os as _os, sys as _sys
import warnings as _warnings
# fastai decorates a few functions with `torch.jit.script`, which torch 2.10+ deprecates at import time: not ours to fix,
# and not something a user of the command lines should read at every start-up
_warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)

# `import fastconvmae` registers the ConvViT classifiers and the MAE models with timm. The `fastconvmae` command itself
# starts without torch (its `--help` answers at once): each subcommand imports what it needs.
if _os.path.basename(_sys.argv[0] if _sys.argv else '') != 'fastconvmae':
    from . import encoder as _encoder  # noqa: F401
