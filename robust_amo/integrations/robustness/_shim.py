"""The one-line compatibility alias robustness 1.2.1 needs with current torchvision.

robustness imports ``torchvision.models.utils``, which torchvision removed in 0.13 (its
``load_state_dict_from_url`` moved to ``torch.hub``). When that module is missing, importing this
module registers an alias module of that name holding only
``load_state_dict_from_url = torch.hub.load_state_dict_from_url``. It changes nothing else. The
package's ``__init__`` imports it before anything imports robustness.
"""

from __future__ import annotations

import importlib
import sys
import types

import torch.hub

SHIM_MODULE = "torchvision.models.utils"


def _install_torchvision_shim() -> bool:
    """Register the ``torchvision.models.utils`` alias robustness needs; True if installed."""
    try:
        importlib.import_module(SHIM_MODULE)
        return False
    except ModuleNotFoundError:
        pass
    shim = types.ModuleType(SHIM_MODULE, "robust-amo alias: torchvision.models.utils was removed "
                                         "in torchvision 0.13; robustness 1.2.1 imports it")
    shim.load_state_dict_from_url = torch.hub.load_state_dict_from_url
    sys.modules[SHIM_MODULE] = shim
    return True


SHIM_INSTALLED = _install_torchvision_shim()
