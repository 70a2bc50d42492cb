__version__ = "0.1.0"

# registers the ConvViT classifiers with timm on `import fastconvmae`
from . import encoder as _encoder  # noqa: F401
