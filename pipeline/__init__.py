"""mmcrf: FCN-8s + graph-cut CRF segmentation trained jointly by max-margin learning."""

from __future__ import annotations

import warnings

__version__ = "0.1.0"

# With the deploy extra installed, ``import monai`` walks the monai namespace into
# monai.deploy, which imports Holoscan, whose import warns about the stack size limit on every
# command, although only a running Holoscan application needs the larger stack. That one
# application raises the limit itself (pipeline.deploy.app); everywhere else the warning is
# noise, so this one message from this one module is ignored.
warnings.filterwarnings("ignore", message=r"Current stack size .* below the recommended minimum",
                        category=RuntimeWarning, module=r"holoscan\.core")
