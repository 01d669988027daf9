"""run_recipe.py on a machine without a GPU, for dynamo-level checks (graph breaks,
recompiles, what is captured) with `--backend aot_eager --tiny`. Test-only: torch refuses
flex_attention backward on CPU in `_validate_device`; this lifts that check so the flex
configurations can be traced and run with aot_eager (whose flex backward is the dense
reference). Never use it for numbers.

    PYTHONPATH=bundle/py TORCH_TRACE=/tmp/t python3 cpu_check.py flex_pad /tmp/out \\
        --tiny --layers 2 --steps 3 --backend aot_eager --scope model --buckets 384,640
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch.nn.attention.flex_attention as _fa  # noqa: E402

_fa._validate_device = lambda q, k, v: None

import run_recipe  # noqa: E402

sys.exit(run_recipe.main())
