"""The DDP communication hook, re-exported: it lives in the library, ``switchml.hook``.

    from trainer.hook import register      # same as: from switchml.hook import register
"""

from switchml.hook import SwitchMLState, register, switchml_hook

__all__ = ["SwitchMLState", "register", "switchml_hook"]
